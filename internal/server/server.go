// Package server is cacheproxy's HTTP side: the Nix binary-cache protocol on
// the main listener and the admin API on the admin listener, as small
// handlers over the gate (package gate), one file per route group. It owns
// no rule: what is served, refused or retried later is the gate's answer;
// the handlers turn answers into status codes and headers.
//
// Trust model: clients are untrusted and only ever receive what the gate
// serves (narinfos signed by the gatekeeper key, NAR bytes verified before
// their last bytes leave). Admin callers are trusted once they present the
// bearer token.
package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/cluster"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/gate"
	"github.com/cacheproxy/cacheproxy/internal/metrics"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Protocol is what the binary-cache handlers ask of the gate.
type Protocol interface {
	NarInfo(ctx context.Context, hash string) (gate.Answer, error)
	NAR(ctx context.Context, file string) (gate.Answer, error)
	OpenNAR(ctx context.Context, rec *cache.Record, download bool) (gate.Body, error)
	Listing(ctx context.Context, hash string) (gate.Answer, io.ReadCloser, error)
	BuildLog(ctx context.Context, drv string) (io.ReadCloser, error)
}

// Server serves one state dir.
type Server struct {
	cfg   config.Config
	log   *slog.Logger
	m     *metrics.Metrics
	db    *cache.DB
	blobs *cache.Blobs
	gate  *gate.Gate
	node  *cluster.Node // nil without [cluster]
	proto Protocol      // the gate, as the cache protocol handlers see it
	// tokens are the admin tokens with their holders' names; nil with the
	// admin API off.
	tokens []adminToken
	lock   *stateLock
	// running are the upstream clients in use, with the entries they were
	// built from; only Reload changes them.
	running []reused
	// Limits apply to the listeners Serve runs; set before Serve.
	Limits Limits
	stop   context.CancelFunc
	done   chan struct{}
}

// New opens the state dir, loads or creates the gatekeeper key and the
// admin token, and builds the gate. cfg must be validated.
func New(cfg config.Config, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	lock, err := lockStateDir(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	s, err := open(cfg, log, lock)
	if err != nil {
		lock.release()
		return nil, err
	}
	return s, nil
}

func open(cfg config.Config, log *slog.Logger, lock *stateLock) (*Server, error) {
	key, err := LoadOrCreateKey(cfg)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: log, m: metrics.New(), done: make(chan struct{}), Limits: DefaultLimits(), lock: lock}
	if cfg.Admin.Listen != "" {
		var warnings []string
		if s.tokens, warnings, err = loadTokens(cfg); err != nil {
			return nil, err
		}
		for _, w := range warnings {
			log.Warn(w)
		}
	}
	ups, err := s.upstreams(cfg.Upstreams, nil)
	if err != nil {
		return nil, err
	}
	for i, u := range ups {
		s.running = append(s.running, reused{cfg: cfg.Upstreams[i], client: u.Client})
	}
	if s.db, err = cache.OpenDB(filepath.Join(cfg.StateDir, "state.db")); err != nil {
		return nil, err
	}
	if s.blobs, err = cache.OpenBlobs(s.db, cfg.StateDir, int64(cfg.Cache.MaxSize)); err != nil {
		s.db.Close()
		return nil, err
	}
	s.blobs.OnEvict(func(n int, _ int64) { s.m.Evictions.Add(float64(n)) })
	var evidence gate.EvidenceStore
	if cfg.Cluster.Enabled() {
		if s.node, err = s.openCluster(cfg.Cluster); err != nil {
			s.blobs.Close()
			s.db.Close()
			return nil, err
		}
		evidence = s.node
	}
	gs := gateSettings(cfg, ups)
	s.gate, err = gate.New(gate.Options{Policy: gs.Policy, Upstreams: gs.Upstreams, Key: key, DB: s.db, Blobs: s.blobs,
		Metrics: s.m, Log: log, DiskReserve: gs.DiskReserve, NegativeTTL: gs.NegativeTTL,
		ServeCompression: narinfo.Compression(cfg.ServeCompression), Evidence: evidence})
	if err != nil {
		if s.node != nil {
			s.node.Close()
		}
		s.blobs.Close()
		s.db.Close()
		return nil, fmt.Errorf("state db: %w", err)
	}
	s.proto = s.gate
	var ctx context.Context
	ctx, s.stop = context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		s.saveUsageEvery(ctx, usageSaveInterval)
	}()
	go func() {
		defer wg.Done()
		s.gate.Scrub(ctx, cfg.Cache.ScrubPeriod.Duration)
	}()
	if s.node != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.node.Run(ctx)
		}()
	}
	go func() {
		wg.Wait()
		close(s.done)
	}()
	return s, nil
}

// openCluster links the node to etcd. The mirror checks what it reads
// with the gate's keys and deny patterns, so it starts (Run) once the
// gate exists.
func (s *Server) openCluster(c config.Cluster) (*cluster.Node, error) {
	tlsConf, err := clusterTLSConfig(c)
	if err != nil {
		return nil, err
	}
	var node *cluster.Node
	rejected := s.m.RegisterCluster(func() (bool, int64) {
		st := node.Status()
		return st.Connected, st.Revision
	})
	node, err = cluster.Open(cluster.Options{Endpoints: c.Etcd, Prefix: c.Prefix, TLS: tlsConf, DB: s.db, Log: s.log,
		Verify:    func(a policy.Attestation) error { return s.gate.VerifyAttestation(a) },
		DenyMatch: func(e []policy.DenyEntry) func(string, narinfo.SHA256) bool { return s.gate.DenyMatcher(e) },
		Rejected:  rejected})
	if err != nil {
		return nil, err
	}
	return node, nil
}

// usageSaveInterval is how often blob last-used times are persisted.
const usageSaveInterval = 5 * time.Minute

// upstreamState records an upstream going down or coming back.
func (s *Server) upstreamState(name string, up bool) {
	if up {
		s.m.UpstreamUp.WithLabelValues(name).Set(1)
		s.log.Info("upstream up", "upstream", name)
		return
	}
	s.m.UpstreamUp.WithLabelValues(name).Set(0)
	s.log.Warn("upstream down: skipped until a probe of /nix-cache-info answers", "upstream", name)
}

func (s *Server) saveUsageEvery(ctx context.Context, d time.Duration) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.blobs.SaveUsage(); err != nil {
				s.log.Error("save blob usage", "err", err)
			}
		}
	}
}

// PublicKey is the gatekeeper key fleet machines trust.
func (s *Server) PublicKey() verify.PublicKey { return s.gate.PublicKey() }

// Close stops downloads and closes the state.
func (s *Server) Close() error {
	s.gate.Close()
	s.stop()
	<-s.done
	var nodeErr error
	if s.node != nil {
		nodeErr = s.node.Close()
	}
	return errors.Join(nodeErr, s.blobs.Close(), s.db.Close(), s.lock.release())
}

// Serve runs the main and admin listeners until ctx ends. The admin
// listener serves HTTPS when admin.tls_cert_file and admin.tls_key_file are
// set, plain HTTP otherwise.
func (s *Server) Serve(ctx context.Context, main, admin net.Listener) error {
	servers := []*http.Server{s.Limits.httpServer(s.Handler())}
	listeners := []net.Listener{newLimitListener(main, s.Limits.MaxConns, s.Limits.Headroom)}
	if admin != nil {
		// Loaded before anything is served, so a pair that stopped loading
		// since Validate fails the start instead of serving clear text.
		tlsConf, err := adminTLSConfig(s.cfg.Admin)
		if err != nil {
			main.Close()
			admin.Close()
			return err
		}
		srv := s.Limits.httpServer(s.AdminHandler())
		srv.TLSConfig = tlsConf
		servers = append(servers, srv)
		listeners = append(listeners, newLimitListener(admin, AdminMaxConns, 0))
	}
	go func() {
		for name, err := range s.gate.CheckUpstreams(ctx) {
			s.log.Warn("upstream does not answer /nix-cache-info at start", "upstream", name, "err", err)
		}
	}()
	errc := make(chan error, len(servers))
	for i := range servers {
		go func() { errc <- serveListener(servers[i], listeners[i]) }()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	s.drain(servers)
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// drain stops accepting and lets the responses in flight (NAR downloads
// above all: a client cut off mid-NAR starts over) finish for up to
// shutdown_timeout, then cuts off what is left.
func (s *Server) drain(servers []*http.Server) {
	timeout := s.cfg.ShutdownTimeout.Duration
	s.log.Info("draining: listeners closed, waiting for responses in flight", "shutdown_timeout", timeout.String())
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, srv := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Shutdown(ctx); err != nil {
				srv.Close()
			}
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		s.log.Warn("shutdown_timeout reached: responses still in flight were cut off", "shutdown_timeout", timeout.String())
	}
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
	case p == "/":
		return "status", s.handleStatus
	case p == "/nix-cache-info":
		return "nix-cache-info", s.handleCacheInfo
	case p == "/healthz":
		return "healthz", s.handleHealthz
	case p == "/metrics":
		return "metrics", s.m.Handler().ServeHTTP
	case s.node != nil && !s.node.Ready() && (strings.HasPrefix(p, "/nar/") || strings.HasSuffix(p, ".narinfo") || strings.HasSuffix(p, ".ls")):
		return "unsynced", s.handleUnsynced
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

// retryAfter is what a client is told to wait when every upstream failed.
const retryAfter = "30"

// writeAnswer writes a gate answer that serves nothing: a rejection (404
// with the decision header), not found, or unavailable (503 + Retry-After).
func (s *Server) writeAnswer(w http.ResponseWriter, a gate.Answer) {
	if a.Decision != "" {
		w.Header().Set("X-Cacheproxy-Decision", a.Decision)
	}
	switch a.Status {
	case gate.Unavailable:
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, a.Detail, http.StatusServiceUnavailable)
	default:
		http.Error(w, a.Detail, http.StatusNotFound)
	}
}

func (s *Server) internalError(w http.ResponseWriter, what string, err error) {
	s.log.Error(what, "err", err)
	http.Error(w, "internal error", http.StatusInternalServerError)
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
		if s.Limits.Write > 0 {
			extendWrite(w, s.Limits.Write)
		}
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
			s.m.HTTPRequests.WithLabelValues(name, fmt.Sprint(code)).Inc()
			s.m.HTTPDuration.WithLabelValues(name).Observe(time.Since(start).Seconds())
		}()
		h.ServeHTTP(sw, r)
	})
}
