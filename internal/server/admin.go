package server

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/pprof"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cluster"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/gate"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// Bounds on admin input (attestation imports: maxAttestBody). Every
// request but an attestation import is a short JSON object. A field longer than its bound is refused with a 400
// before anything is written (bbolt refuses keys over 32 KiB, which would
// otherwise surface as a 500).
const (
	maxJSONBody    = 4 << 20
	maxFieldLen    = 1024    // a store path, pattern or hash
	maxReasonLen   = 4 << 10 // a free-text reason
	maxFieldsCount = 100000  // paths or patterns in one request
)

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
	mux.HandleFunc("GET "+adminapi.PathAudit, s.handleAudit)
	mux.HandleFunc("GET "+adminapi.PathRebuildQueue, s.handleRebuildQueue)
	s.handleProfiles(mux)
	return s.instrument("admin", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		who, ok := s.caller(r)
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="cacheproxy"`)
			writeError(w, http.StatusUnauthorized, "missing or wrong bearer token")
			return
		}
		mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, who)))
	}))
}

// caller returns the name of the admin token the request carries. Every
// token is compared, in constant time, whichever matches, so the time
// taken says nothing about which token (or how much of one) was right.
func (s *Server) caller(r *http.Request) (string, bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return "", false
	}
	match := -1
	for i, t := range s.tokens {
		if subtle.ConstantTimeCompare([]byte(tok), t.token) == 1 {
			match = i
		}
	}
	if match < 0 {
		return "", false
	}
	return s.tokens[match].name, true
}

type callerKey struct{}

// change is who makes the request's change, and why.
func change(r *http.Request, reason string) gate.Change {
	who, _ := r.Context().Value(callerKey{}).(string)
	return gate.Change{Who: who, Reason: reason}
}

// refuse answers a mutating request that never reached the gate with a
// 400, and records the attempt in the audit trail. what and reason must be
// within their bounds: for a body that did not decode, pass none.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, action string, what []string, reason string, err error) {
	s.gate.Refused(change(r, reason), action, what, err)
	writeError(w, http.StatusBadRequest, "%v", err)
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
	case errors.Is(err, gate.ErrUnavailable), errors.Is(err, cluster.ErrUnreachable):
		code = http.StatusServiceUnavailable
	}
	writeError(w, code, "%s%v", prefix, err)
}

// decodeJSON reads a JSON request body strictly: unknown fields, trailing
// data after the object and oversized fields are mistakes, and a mistake
// must not half-apply.
func decodeJSON(w http.ResponseWriter, r *http.Request, v interface{ check() error }) error {
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxJSONBody))
	if err != nil {
		return fmt.Errorf("read request body: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	err = dec.Decode(v)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("trailing data after the JSON object")
		}
	}
	if err == nil {
		err = v.check()
	}
	if err != nil {
		return fmt.Errorf("malformed JSON request: %v", err)
	}
	return nil
}

// checkFields bounds a list of paths or patterns and a reason.
func checkFields(what string, list []string, reason string) error {
	if len(list) > maxFieldsCount {
		return fmt.Errorf("%d %s in one request; at most %d", len(list), what, maxFieldsCount)
	}
	for _, f := range list {
		if len(f) > maxFieldLen {
			return fmt.Errorf("a %s of %d bytes; at most %d", strings.TrimSuffix(what, "s"), len(f), maxFieldLen)
		}
	}
	if len(reason) > maxReasonLen {
		return fmt.Errorf("a reason of %d bytes; at most %d", len(reason), maxReasonLen)
	}
	return nil
}

// Request bodies, each with its bounds.
type (
	pathsRequest    struct{ adminapi.PathsRequest }
	patternsRequest struct{ adminapi.PatternsRequest }
	allowRequest    struct{ adminapi.AllowRequest }
	denyRequest     struct{ adminapi.DenyRequest }
)

func (r *pathsRequest) check() error    { return checkFields("paths", r.Paths, r.Reason) }
func (r *patternsRequest) check() error { return checkFields("patterns", r.Patterns, r.Reason) }
func (r *allowRequest) check() error {
	if len(r.Expires) > maxFieldLen {
		return fmt.Errorf("an expiry of %d bytes", len(r.Expires))
	}
	return checkFields("paths", r.Paths, r.Reason)
}
func (r *denyRequest) check() error { return checkFields("patterns", r.Patterns, r.Reason) }

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

// pathsRequest decodes a PathsRequest into hashes and its reason,
// answering 400 itself (and recording the refusal as action).
func (s *Server) pathsRequest(w http.ResponseWriter, r *http.Request, action string) ([]string, string, bool) {
	var req pathsRequest
	if err := decodeJSON(w, r, &req); err != nil {
		s.refuse(w, r, action, nil, "", err)
		return nil, "", false
	}
	hashes, err := s.pathHashes(req.Paths)
	if err != nil {
		s.refuse(w, r, action, req.Paths, req.Reason, err)
		return nil, "", false
	}
	return hashes, req.Reason, true
}

// handleProfiles serves Go's runtime profiles (CPU, heap, allocations,
// goroutines, execution trace) under /debug/pprof/ on the admin API, behind
// its token: that is how bench/README.md finds where time and memory go in
// a running server. They never go on the main listener: a profile shows
// internals and a CPU profile costs CPU for as long as it runs.
func (s *Server) handleProfiles(mux *http.ServeMux) {
	// A CPU profile or trace writes nothing until it ends: its write
	// deadline must outlast the seconds asked for.
	timed := func(h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if sec, err := strconv.Atoi(r.FormValue("seconds")); err == nil && sec > 0 && s.Limits.Write > 0 {
				extendWrite(w, s.Limits.Write+time.Duration(sec)*time.Second)
			}
			h(w, r)
		}
	}
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/profile", timed(pprof.Profile))
	mux.HandleFunc("GET /debug/pprof/trace", timed(pprof.Trace))
}
