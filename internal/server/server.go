// Package server is cacheproxy's HTTP side: the Nix binary-cache protocol on
// the main listener and the admin API on the admin listener. It wires the
// other packages together and owns no rule of its own: decisions come from
// package policy, NAR checks from package verify, state from package cache.
//
// Trust model: clients are untrusted and only ever receive narinfos the
// policy approved (signed by the gatekeeper key) and NAR bytes whose hashes
// were checked before the last bytes left. Admin callers are trusted once
// they present the bearer token.
package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// upstreamCache is one configured upstream with the keys it must sign with.
type upstreamCache struct {
	client *upstream.Client
	name   string
	keys   []verify.PublicKey
}

// Server serves one state dir.
type Server struct {
	cfg       config.Config
	log       *slog.Logger
	db        *cache.DB
	blobs     *cache.Blobs
	policy    policy.Policy
	upstreams []*upstreamCache
	key       verify.SecretKey
	token     []byte
	m         *metrics
	now       func() time.Time

	narinfoFlight singleflight.Group
	hot           *hotRecords

	dlMu      sync.Mutex
	downloads map[string]*download // by NAR file name
	closed    bool
	shortRuns map[string]int // NAR file -> transfers in a row that ended short with no declared length

	// bg is the lifetime of downloads: they outlive the request that
	// started them (followers and the cache still want the bytes) but not
	// the server.
	bg     context.Context
	stopBg context.CancelFunc
	bgWG   sync.WaitGroup
}

// New opens the state dir, loads or creates the gatekeeper key and the
// admin token, and prepares the upstream clients. cfg must be validated.
func New(cfg config.Config, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	key, err := LoadOrCreateKey(cfg)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: log, key: key, m: newMetrics(), now: time.Now, downloads: map[string]*download{}, shortRuns: map[string]int{}, hot: newHotRecords()}
	if cfg.Admin.Listen != "" {
		if s.token, err = loadOrCreateToken(cfg.AdminTokenFile()); err != nil {
			return nil, err
		}
	}
	s.policy = policy.Policy{
		StoreDir:         cfg.StoreDir,
		Quorum:           cfg.Policy.Quorum,
		ContentAddressed: cfg.Policy.ContentAddressed,
		RequireClosure:   cfg.Policy.RequireClosure,
		Report:           cfg.Mode == config.ModeReport,
	}
	for i, a := range cfg.Policy.Attesters {
		k, err := verify.ParsePublicKey(a)
		if err != nil {
			return nil, fmt.Errorf("policy.attesters[%d]: %w", i, err)
		}
		s.policy.Attesters = append(s.policy.Attesters, k)
	}
	for i, u := range cfg.Upstreams {
		c, err := upstream.New(upstream.Options{URL: u.URL, Timeout: u.Timeout.Duration, NetrcFile: u.NetrcFile, UserAgent: "cacheproxy"})
		if err != nil {
			return nil, fmt.Errorf("upstreams[%d]: %w", i, err)
		}
		uc := &upstreamCache{client: c, name: c.Name()}
		for j, pk := range u.PublicKeys {
			k, err := verify.ParsePublicKey(pk)
			if err != nil {
				return nil, fmt.Errorf("upstreams[%d].public_keys[%d]: %w", i, j, err)
			}
			uc.keys = append(uc.keys, k)
		}
		s.upstreams = append(s.upstreams, uc)
	}

	if s.db, err = cache.OpenDB(filepath.Join(cfg.StateDir, "state.db")); err != nil {
		return nil, err
	}
	if s.blobs, err = cache.OpenBlobs(s.db, cfg.StateDir, int64(cfg.Cache.MaxSize)); err != nil {
		s.db.Close()
		return nil, err
	}
	s.blobs.OnEvict(func(n int, _ int64) { s.m.evictions.Add(float64(n)) })
	s.db.ForgetAllOnChange(cfg.Policy.RequireClosure)
	changed, err := s.db.SyncSettings(s.settingsDigest())
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("state db: %w", err)
	}
	if changed {
		log.Info("decision settings changed since the last start: every path will be decided again")
	}
	s.refreshGauges()
	s.bg, s.stopBg = context.WithCancel(context.Background())
	s.bgWG.Add(1)
	go func() {
		defer s.bgWG.Done()
		s.saveUsageEvery(usageSaveInterval)
	}()
	return s, nil
}

// settingsDigest names everything a stored decision depends on besides the
// evidence in the DB: if any of it changes between starts (a revoked
// upstream key, a higher quorum, report mode turned off, a new gatekeeper
// key), stored decisions must not be served.
func (s *Server) settingsDigest() string {
	type up struct {
		URL  string
		Keys []string
	}
	v := struct {
		Report, ContentAddressed, RequireClosure bool
		StoreDir, Gatekeeper                     string
		Quorum                                   int
		Attesters                                []string
		Upstreams                                []up
	}{s.policy.Report, s.policy.ContentAddressed, s.policy.RequireClosure,
		s.cfg.StoreDir, s.key.Public().String(), s.policy.Quorum, nil, nil}
	for _, a := range s.policy.Attesters {
		v.Attesters = append(v.Attesters, a.String())
	}
	sort.Strings(v.Attesters)
	for _, u := range s.upstreams {
		e := up{URL: u.name}
		for _, k := range u.keys {
			e.Keys = append(e.Keys, k.String())
		}
		sort.Strings(e.Keys)
		v.Upstreams = append(v.Upstreams, e)
	}
	raw, _ := json.Marshal(v)
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:])
}

// usageSaveInterval is how often blob last-used times are persisted.
const usageSaveInterval = 5 * time.Minute

func (s *Server) saveUsageEvery(d time.Duration) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-s.bg.Done():
			return
		case <-t.C:
			if err := s.blobs.SaveUsage(); err != nil {
				s.log.Error("save blob usage", "err", err)
			}
		}
	}
}

// PublicKey is the gatekeeper key fleet machines trust.
func (s *Server) PublicKey() verify.PublicKey { return s.key.Public() }

// Close stops downloads and closes the state.
func (s *Server) Close() error {
	s.dlMu.Lock()
	s.closed = true // join starts no download after this
	s.dlMu.Unlock()
	if s.stopBg != nil {
		s.stopBg()
	}
	s.bgWG.Wait()
	return errors.Join(s.blobs.Close(), s.db.Close())
}

// Serve runs the main and admin listeners until ctx ends.
func (s *Server) Serve(ctx context.Context, main, admin net.Listener) error {
	servers := []*http.Server{{Handler: s.Handler(), ReadHeaderTimeout: 30 * time.Second}}
	listeners := []net.Listener{main}
	if admin != nil {
		servers = append(servers, &http.Server{Handler: s.AdminHandler(), ReadHeaderTimeout: 30 * time.Second})
		listeners = append(listeners, admin)
	}
	errc := make(chan error, len(servers))
	for i := range servers {
		go func() { errc <- servers[i].Serve(listeners[i]) }()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, srv := range servers {
		srv.Shutdown(shutdown)
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// Handler is the binary-cache protocol. Routing is by hand rather than by
// ServeMux so that no path cleaning or redirect ever turns a malformed
// request into something else: anything unexpected is a 4xx that never
// reaches an upstream.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name, h := s.route(r)
		s.instrument(name, h).ServeHTTP(w, r)
	})
}

func (s *Server) route(r *http.Request) (string, http.HandlerFunc) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return "other", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		}
	}
	p := r.URL.Path
	if r.URL.RawPath != "" || strings.Contains(p, "..") || strings.Contains(p, "//") {
		return "other", badRequest("malformed path")
	}
	switch {
	case p == "/nix-cache-info":
		return "nix-cache-info", s.handleCacheInfo
	case p == "/healthz":
		return "healthz", s.handleHealthz
	case p == "/metrics":
		return "metrics", s.m.handler().ServeHTTP
	case strings.HasPrefix(p, "/nar/"):
		return "nar", s.handleNar
	case strings.HasPrefix(p, "/log/"):
		return "log", s.handleLog
	case strings.HasSuffix(p, ".narinfo") && strings.Count(p, "/") == 1:
		return "narinfo", s.handleNarInfo
	case strings.HasSuffix(p, ".ls") && strings.Count(p, "/") == 1:
		return "ls", s.handleListing
	}
	return "other", http.NotFound
}

func badRequest(msg string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { http.Error(w, msg, http.StatusBadRequest) }
}

// statusWriter records the status code for metrics and whether headers went out.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

// ReadFrom keeps http.ServeContent on the sendfile path: without it the
// wrapper would hide the connection's ReaderFrom and cached NARs would be
// copied through a userspace buffer.
func (w *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return readFrom(w.ResponseWriter, r)
}

func readFrom(w http.ResponseWriter, r io.Reader) (int64, error) {
	if rf, ok := w.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{w}, r)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (s *Server) instrument(name string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			code := sw.code
			if code == 0 {
				code = http.StatusOK
			}
			if p := recover(); p != nil {
				code = 0 // aborted mid-response
				defer panic(p)
			}
			s.m.httpRequests.WithLabelValues(name, fmt.Sprint(code)).Inc()
			s.m.httpDuration.WithLabelValues(name).Observe(time.Since(start).Seconds())
		}()
		h.ServeHTTP(sw, r)
	})
}

func (s *Server) handleCacheInfo(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/x-nix-cache-info")
	fmt.Fprintf(w, "StoreDir: %s\nWantMassQuery: 1\nPriority: %d\n", s.cfg.StoreDir, s.cfg.Priority)
}

func (s *Server) handleHealthz(w http.ResponseWriter, r *http.Request) {
	if err := s.db.Writable(); err != nil {
		http.Error(w, "state store not writable: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ok")
}

func (s *Server) refreshGauges() {
	if n, err := s.db.CountAttestations(); err == nil {
		s.m.attestations.Set(float64(n))
	}
	if l, err := s.db.AllowList(); err == nil {
		s.m.allowEntries.Set(float64(len(l)))
	}
	s.m.cacheSize.Set(float64(s.blobs.Size()))
}

// authorized compares the bearer token in constant time.
func (s *Server) authorized(r *http.Request) bool {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && len(s.token) > 0 && subtle.ConstantTimeCompare([]byte(tok), s.token) == 1
}
