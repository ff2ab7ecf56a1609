package server

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/gate"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// maxAdminBody bounds admin request bodies (a closure's path-info JSON of
// tens of thousands of paths fits easily).
const maxAdminBody = 256 << 20

// AdminHandler is the admin API. Every route requires the bearer token.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+adminapi.PathAttestations, s.handleAttest)
	mux.HandleFunc("GET "+adminapi.PathAllowlist, s.handleAllowList)
	mux.HandleFunc("POST "+adminapi.PathAllowlist, s.handleAllowAdd)
	mux.HandleFunc("DELETE "+adminapi.PathAllowlist, s.handleAllowRemove)
	mux.HandleFunc("GET "+adminapi.PathDenylist, s.handleDenyList)
	mux.HandleFunc("POST "+adminapi.PathDenylist, s.handleDenyAdd)
	mux.HandleFunc("DELETE "+adminapi.PathDenylist, s.handleDenyRemove)
	mux.HandleFunc("GET "+adminapi.PathExplain+"{hash}", s.handleExplain)
	mux.HandleFunc("GET "+adminapi.PathRejections, s.handleRejections)
	mux.HandleFunc("POST "+adminapi.PathRetry, s.handleRetry)
	mux.HandleFunc("POST "+adminapi.PathVerifyCache, s.handleVerifyCache)
	return s.instrument("admin", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="cacheproxy"`)
			writeError(w, http.StatusUnauthorized, "missing or wrong bearer token")
			return
		}
		mux.ServeHTTP(w, r)
	}))
}

// authorized compares the bearer token in constant time.
func (s *Server) authorized(r *http.Request) bool {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && len(s.token) > 0 && subtle.ConstantTimeCompare([]byte(tok), s.token) == 1
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, format string, args ...any) {
	writeJSON(w, code, adminapi.Error{Error: fmt.Sprintf(format, args...)})
}

// writeGateError answers an error from the gate with the status its kind
// calls for.
func writeGateError(w http.ResponseWriter, prefix string, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, gate.ErrInvalid):
		code = http.StatusBadRequest
	case errors.Is(err, gate.ErrNotFound):
		code = http.StatusNotFound
	case errors.Is(err, gate.ErrUnavailable):
		code = http.StatusServiceUnavailable
	}
	writeError(w, code, "%s%v", prefix, err)
}

// readBody reads a bounded request body.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAdminBody))
	if err != nil {
		writeError(w, http.StatusBadRequest, "read request body: %v", err)
		return nil, false
	}
	return raw, true
}

// decodeJSON reads a JSON request body strictly: unknown fields are
// mistakes, and a mistake must not half-apply.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	raw, ok := readBody(w, r)
	if !ok {
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "malformed JSON request: %v", err)
		return false
	}
	return true
}

// pathHash accepts "/nix/store/<hash>-<name>", "<hash>-<name>" or a bare
// hash and returns the hash.
func (s *Server) pathHash(arg string) (string, error) {
	arg = strings.TrimSpace(arg)
	if narinfo.ValidHash(arg) {
		return arg, nil
	}
	if strings.HasPrefix(arg, "/") {
		sp, err := narinfo.ParseStorePath(arg, s.cfg.StoreDir)
		if err != nil {
			return "", fmt.Errorf("%q is not a store path in %s: %v", arg, s.cfg.StoreDir, err)
		}
		return sp.Hash, nil
	}
	hash, _, err := narinfo.ParseBaseName(path.Base(arg))
	if err != nil {
		return "", fmt.Errorf("%q is neither a store path nor a 32-character store path hash", arg)
	}
	return hash, nil
}

// pathHashes converts every argument or fails on the first bad one, so
// that nothing is applied for a request with a typo in it.
func (s *Server) pathHashes(args []string) ([]string, error) {
	if len(args) == 0 {
		return nil, errors.New("no paths given")
	}
	out := make([]string, 0, len(args))
	for _, a := range args {
		h, err := s.pathHash(a)
		if err != nil {
			return nil, err
		}
		out = append(out, h)
	}
	return out, nil
}

// pathsRequest decodes a PathsRequest into hashes, answering 400 itself.
func (s *Server) pathsRequest(w http.ResponseWriter, r *http.Request) ([]string, bool) {
	var req adminapi.PathsRequest
	if !decodeJSON(w, r, &req) {
		return nil, false
	}
	hashes, err := s.pathHashes(req.Paths)
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return nil, false
	}
	return hashes, true
}
