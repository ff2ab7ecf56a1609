// Package upstream fetches files from one binary cache (HTTP(S) or a file://
// directory) and classifies every outcome as exactly one of three things:
// found (bytes), not found (ErrNotFound) or unavailable (*UnavailableError).
//
// The distinction matters because Nix caches a 404 for an hour: an upstream
// that times out, refuses connections, answers 5xx/429 or sends a broken
// response is "unavailable" — the server answers 503 — and never "not found".
//
// Trust model: nothing an upstream sends is trusted here. This package only
// moves bytes and bounds them (size limits, timeouts, truncation detection);
// signatures and hashes are checked by the callers. What it does guarantee is
// that a request never leaves the configured cache root: the relative paths
// it is given come from upstream narinfos (the URL field), so they are
// attacker-controlled and are rejected when absolute, carrying a scheme or
// host, or containing "..". Redirects are followed only within the
// upstream's origin (scheme, host and port), so neither a request nor the
// netrc credentials riding on it ever reach another server.
//
// It also protects the upstream and the callers from each other: at most
// MaxConnections requests are in flight to one upstream, and an upstream that
// stops answering is marked down (ErrDown) and probed with backoff instead of
// costing every request a full timeout.
package upstream

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// ErrNotFound means the upstream answered authoritatively that it does not
// have the file (HTTP 404, 403 or 410, or a missing file in a file:// cache).
var ErrNotFound = errors.New("not found")

// ErrInvalidPath means a relative path was refused before any request was
// made: absolute, with a scheme or host, with "..", or otherwise able to
// leave the cache root. For a narinfo URL field this means a malformed (or
// hostile) narinfo, not an unavailable upstream.
var ErrInvalidPath = errors.New("invalid path relative to the cache root")

// ErrTooLarge is wrapped in the *UnavailableError Get returns when the file
// exceeds maxBytes.
var ErrTooLarge = errors.New("response too large")

// ErrTimeout is wrapped when a request or a body read hit the configured
// timeout (as opposed to the caller's context being cancelled).
var ErrTimeout = errors.New("timed out")

// ErrNotCacheData is wrapped in the *UnavailableError returned when the
// upstream answered 200 with an HTML page (a login wall, a proxy's error
// page) instead of the file. Treating such a page as data would turn a
// narinfo into an upstream_malformed rejection that Nix caches for an hour,
// or a NAR into a hash mismatch that quarantines the path.
var ErrNotCacheData = errors.New("upstream answered with an HTML page, not binary-cache data")

// ErrRedirectRefused is wrapped in the *UnavailableError returned when the
// upstream redirected to another origin (scheme, host or port) or redirected
// more than MaxRedirects times.
var ErrRedirectRefused = errors.New("redirect refused")

// ErrDown is wrapped in the *UnavailableError returned without any request
// while the upstream is marked down (see Client.Up).
var ErrDown = errors.New("upstream marked down")

// UnavailableError means the upstream could not answer: connection refused,
// timeout, 5xx, 429, a malformed or truncated response, an HTML page
// (ErrNotCacheData), a refused redirect (ErrRedirectRefused), or the
// upstream being marked down (ErrDown). It is transient: callers answer 503,
// never 404.
type UnavailableError struct {
	Upstream   string // Client.Name()
	StatusCode int    // the HTTP status when there was one, else 0
	Err        error
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("upstream %s unavailable: %v", e.Upstream, e.Err)
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// IsUnavailable reports whether err is (or wraps) an *UnavailableError.
func IsUnavailable(err error) bool {
	var u *UnavailableError
	return errors.As(err, &u)
}

// Defaults for the zero values of Options.
const (
	DefaultTimeout         = 30 * time.Second
	DefaultMaxConnections  = 64
	DefaultDownAfter       = 3
	DefaultProbeBackoff    = time.Second
	DefaultMaxProbeBackoff = time.Minute
)

// MaxRedirects is how many same-origin redirects one request follows.
const MaxRedirects = 5

// Options configures a Client.
type Options struct {
	URL string // http://, https:// or file:///abs/dir: the cache root
	// Timeout bounds a whole Get; for Open it bounds the wait for response
	// headers and each wait for more body bytes (idle time), so a large NAR
	// on a slow but live connection is never cut off.
	Timeout   time.Duration
	NetrcFile string // HTTP basic auth credentials (machine/login/password/default)
	UserAgent string
	Transport http.RoundTripper // nil: a transport owned by this Client

	// MaxConnections bounds the requests in flight to this upstream (an Open
	// holds its place until the body is closed); 0 means
	// DefaultMaxConnections. Further callers wait for as long as their
	// context allows; the wait does not count against Timeout.
	MaxConnections int

	// DownAfter is how many consecutive failures (no answer, a timeout, a
	// 5xx) mark the upstream down; 0 means DefaultDownAfter.
	DownAfter int
	// ProbeBackoff is how long a down upstream is left alone before the
	// first probe of nix-cache-info; it doubles after each failed probe, up
	// to MaxProbeBackoff. Zero values mean DefaultProbeBackoff and
	// DefaultMaxProbeBackoff (or ProbeBackoff, if that is larger).
	ProbeBackoff    time.Duration
	MaxProbeBackoff time.Duration
	// OnStateChange, when set, is called with false when the upstream is
	// marked down and with true when it answers again. Calls are serialised
	// and in order, never repeat the previous state, and come from whichever
	// goroutine saw the change, so the function must not block.
	OnStateChange func(up bool)
}

// Client talks to one upstream. It is safe for concurrent use.
type Client struct {
	name      string
	base      *url.URL // HTTP(S) cache root; nil for file:// upstreams
	dir       string   // file:// cache root; "" for HTTP
	timeout   time.Duration
	userAgent string
	login     string
	password  string
	hasAuth   bool
	http      *http.Client
	ownsTrans *http.Transport // the transport New created, to close idle conns
	slots     chan struct{}   // one token per request in flight; capacity MaxConnections
	health    health
}

// New creates a client for one upstream. It reads the netrc file once, here:
// credentials changes need a restart, like every other config change.
func New(o Options) (*Client, error) {
	u, err := url.Parse(o.URL)
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %w", o.URL, err)
	}
	// Errors name the URL redacted, as Name does: they end up in logs.
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("upstream %s: a cache root cannot have a query or fragment", u.Redacted())
	}
	if o.Timeout < 0 {
		return nil, fmt.Errorf("upstream %s: negative timeout %s", u.Redacted(), o.Timeout)
	}
	if o.MaxConnections < 0 || o.DownAfter < 0 {
		return nil, fmt.Errorf("upstream %s: negative max connections (%d) or down-after count (%d)", u.Redacted(), o.MaxConnections, o.DownAfter)
	}
	if o.ProbeBackoff < 0 || o.MaxProbeBackoff < 0 {
		return nil, fmt.Errorf("upstream %s: negative probe backoff (%s, max %s)", u.Redacted(), o.ProbeBackoff, o.MaxProbeBackoff)
	}
	minBackoff := cmp.Or(o.ProbeBackoff, DefaultProbeBackoff)
	maxBackoff := o.MaxProbeBackoff
	if maxBackoff == 0 {
		maxBackoff = max(DefaultMaxProbeBackoff, minBackoff)
	}
	if maxBackoff < minBackoff {
		return nil, fmt.Errorf("upstream %s: probe backoff %s exceeds its maximum %s", u.Redacted(), minBackoff, maxBackoff)
	}
	maxConns := cmp.Or(o.MaxConnections, DefaultMaxConnections)
	c := &Client{
		name:      u.Redacted(), // Name is used in logs and metric labels: no passwords
		timeout:   o.Timeout,
		userAgent: o.UserAgent,
		slots:     make(chan struct{}, maxConns),
		health: health{
			downAfter:  cmp.Or(o.DownAfter, DefaultDownAfter),
			minBackoff: minBackoff,
			maxBackoff: maxBackoff,
			onChange:   o.OnStateChange,
			now:        time.Now,
			notifiedUp: true,
		},
	}
	if c.timeout == 0 {
		c.timeout = DefaultTimeout
	}
	if c.userAgent == "" {
		c.userAgent = "cacheproxy"
	}

	switch u.Scheme {
	case "file":
		if u.Opaque != "" || (u.Host != "" && u.Host != "localhost") || !strings.HasPrefix(u.Path, "/") {
			return nil, fmt.Errorf("upstream %s: a file URL must name an absolute directory, like file:///srv/cache", u.Redacted())
		}
		c.dir = u.Path
		return c, nil
	case "http", "https":
		if u.Hostname() == "" {
			return nil, fmt.Errorf("upstream %s: missing host", u.Redacted())
		}
	default:
		return nil, fmt.Errorf("upstream %s: scheme must be http, https or file", u.Redacted())
	}
	// Relative names resolve under the root, so the root path must end in "/".
	base := *u
	if !strings.HasSuffix(base.Path, "/") {
		base.Path += "/"
		if base.RawPath != "" {
			base.RawPath += "/"
		}
	}
	c.base = &base

	if o.NetrcFile != "" {
		data, err := os.ReadFile(o.NetrcFile)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: reading netrc: %w", c.name, err)
		}
		login, password, ok, err := netrcLookup(string(data), u.Hostname())
		if err != nil {
			return nil, fmt.Errorf("upstream %s: netrc %s: %w", c.name, o.NetrcFile, err)
		}
		c.login, c.password, c.hasAuth = login, password, ok
	}

	rt := o.Transport
	if rt == nil {
		c.ownsTrans = newTransport(maxConns)
		rt = c.ownsTrans
	}
	// No http.Client.Timeout: it would cap a whole NAR download. Deadlines
	// are per call, through contexts.
	c.http = &http.Client{Transport: rt, CheckRedirect: c.checkRedirect}
	return c, nil
}

// newTransport is a pooled transport for one upstream. Each Client owns its
// own so one slow upstream cannot exhaust another's connections. The slots
// already bound the requests in flight to maxConns; the transport gets the
// same bound so no code path (a redirect, a retried dial) can open more, and
// keeps as many idle so a burst's connections serve the next burst without
// new TLS handshakes.
func newTransport(maxConns int) *http.Transport {
	return &http.Transport{
		// Fleets behind a corporate proxy configure it like curl (and so Nix)
		// expects: through HTTP(S)_PROXY / NO_PROXY.
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxConnsPerHost:       maxConns,
		MaxIdleConns:          maxConns,
		MaxIdleConnsPerHost:   maxConns,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// Name identifies the upstream in logs and metric labels: its URL with any
// password redacted.
func (c *Client) Name() string { return c.name }

// CloseIdleConnections releases pooled connections (on shutdown or reload).
func (c *Client) CloseIdleConnections() {
	if c.ownsTrans != nil {
		c.ownsTrans.CloseIdleConnections()
	}
}

func (c *Client) unavailable(status int, format string, args ...any) error {
	return &UnavailableError{Upstream: c.name, StatusCode: status, Err: fmt.Errorf(format, args...)}
}

func (c *Client) notFound(rel, how string) error {
	return fmt.Errorf("upstream %s: %s: %s: %w", c.name, rel, how, ErrNotFound)
}

// Get fetches a small file (narinfo, nix-cache-info, .ls) relative to the
// cache root, reading at most maxBytes (a larger file is an error wrapping
// ErrTooLarge). 200 gives the body; 404, 403 (S3's answer for a missing
// key) and 410 give an error wrapping ErrNotFound; anything else, including
// timeouts, an HTML page (ErrNotCacheData), a refused redirect
// (ErrRedirectRefused) and a down upstream (ErrDown), gives an
// *UnavailableError. Timeout bounds the request itself, not the wait for a
// connection slot.
func (c *Client) Get(ctx context.Context, rel string, maxBytes int64) ([]byte, error) {
	ref, err := checkRel(rel)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", c.name, err)
	}
	if err := c.admit(ctx, rel); err != nil {
		return nil, err
	}
	release, err := c.acquire(ctx, rel)
	if err != nil {
		return nil, err
	}
	defer release()
	if err := c.stillUp(rel); err != nil {
		return nil, err
	}

	var (
		body []byte
		v    verdict
	)
	if c.dir != "" {
		body, v, err = c.getFile(ctx, rel, ref, maxBytes)
	} else {
		body, v, err = c.getHTTP(ctx, rel, ref, maxBytes)
	}
	c.record(ctx, v, err)
	return body, err
}

func (c *Client) getHTTP(ctx context.Context, rel string, ref *url.URL, maxBytes int64) ([]byte, verdict, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, c.timeout,
		fmt.Errorf("no complete answer within %s: %w", c.timeout, ErrTimeout))
	defer cancel()
	resp, err := c.do(ctx, ref)
	if err != nil {
		return nil, transportVerdict(err), c.unavailable(statusOf(resp), "GET %s: %w", rel, c.explain(ctx, err))
	}
	defer resp.Body.Close()
	if err := c.checkStatus(resp, rel); err != nil {
		return nil, statusVerdict(resp.StatusCode), err
	}
	if ct := resp.Header.Get("Content-Type"); isHTML(ct) {
		return nil, answered, c.notCacheData(resp.StatusCode, rel, "Content-Type "+ct)
	}
	if resp.ContentLength > maxBytes {
		return nil, answered, c.unavailable(resp.StatusCode, "GET %s: %d bytes, limit %d: %w", rel, resp.ContentLength, maxBytes, ErrTooLarge)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBytes+1))
	if err != nil {
		return nil, failing, c.unavailable(resp.StatusCode, "GET %s: reading body: %w", rel, c.explain(ctx, err))
	}
	if int64(len(body)) > maxBytes {
		return nil, answered, c.unavailable(resp.StatusCode, "GET %s: more than %d bytes: %w", rel, maxBytes, ErrTooLarge)
	}
	// Many error pages come without an HTML Content-Type (or as text/plain
	// from a misconfigured proxy). Narinfos, nix-cache-info and .ls listings
	// can never start with "<"; build logs are free text that may, so only
	// their Content-Type is checked. An encoded body is binary, not text.
	if !isBuildLog(ref) && identityEncoded(resp) && startsWithMarkup(body) {
		return nil, answered, c.notCacheData(resp.StatusCode, rel, "a body starting with \"<\"")
	}
	return body, answered, nil
}

// Open starts the download of a large file (a NAR) relative to the cache
// root. size is the Content-Length, or -1 when the upstream does not say.
// The body fails with an error wrapping ErrTimeout when the upstream sends
// nothing for Timeout (a stalled upstream is an error, not a hang), and with
// an error wrapping io.ErrUnexpectedEOF when it ends before Content-Length.
// Errors are classified as for Get; body read errors are *UnavailableError.
// An HTML Content-Type is refused (ErrNotCacheData), but the body is never
// sniffed: compressed NARs may begin with any byte.
//
// The download holds one of the MaxConnections slots until the body is
// closed, so the caller must always Close it.
func (c *Client) Open(ctx context.Context, rel string) (body io.ReadCloser, size int64, err error) {
	ref, err := checkRel(rel)
	if err != nil {
		return nil, 0, fmt.Errorf("upstream %s: %w", c.name, err)
	}
	if err := c.admit(ctx, rel); err != nil {
		return nil, 0, err
	}
	release, err := c.acquire(ctx, rel)
	if err != nil {
		return nil, 0, err
	}
	if err := c.stillUp(rel); err != nil {
		release()
		return nil, 0, err
	}

	var v verdict
	if c.dir != "" {
		body, size, v, err = c.openFile(ctx, rel, ref, release)
	} else {
		body, size, v, err = c.openHTTP(ctx, rel, ref, release)
	}
	c.record(ctx, v, err)
	if err != nil {
		release()
		return nil, 0, err
	}
	return body, size, nil
}

func (c *Client) openHTTP(ctx context.Context, rel string, ref *url.URL, release func()) (io.ReadCloser, int64, verdict, error) {
	// One cancellable context serves both phases: a timer cancels it if the
	// headers are late, and later if a body read waits too long. The cause
	// tells a timeout apart from the caller giving up.
	ctx, cancel := context.WithCancelCause(ctx)
	headerTimer := time.AfterFunc(c.timeout, func() {
		cancel(fmt.Errorf("no response headers within %s: %w", c.timeout, ErrTimeout))
	})
	resp, err := c.do(ctx, ref)
	headerTimer.Stop()
	if err != nil {
		// Explained before cancel: afterwards every error would seem to be
		// a cancellation.
		err = c.unavailable(statusOf(resp), "GET %s: %w", rel, c.explain(ctx, err))
		cancel(nil)
		return nil, 0, transportVerdict(err), err
	}
	if err := c.checkStatus(resp, rel); err != nil {
		resp.Body.Close()
		cancel(nil)
		return nil, 0, statusVerdict(resp.StatusCode), err
	}
	if ct := resp.Header.Get("Content-Type"); isHTML(ct) {
		resp.Body.Close()
		cancel(nil)
		return nil, 0, answered, c.notCacheData(resp.StatusCode, rel, "Content-Type "+ct)
	}
	b := &httpBody{
		c:       c,
		rel:     rel,
		rc:      resp.Body,
		ctx:     ctx,
		cancel:  cancel,
		release: release,
		want:    resp.ContentLength,
		status:  resp.StatusCode,
	}
	b.idleTimer = time.AfterFunc(c.timeout, func() {
		cancel(fmt.Errorf("no data for %s: %w", c.timeout, ErrTimeout))
	})
	b.idleTimer.Stop() // armed only while a Read waits
	return b, resp.ContentLength, answered, nil
}

// do sends one GET. When a redirect is refused, the response is the 3xx
// that asked for it (body closed) and the error is checkRedirect's, unwrapped
// from Go's *url.Error: that would quote the full Location, query included,
// which for a presigned URL is a credential.
func (c *Client) do(ctx context.Context, ref *url.URL) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base.ResolveReference(ref).String(), nil)
	if err != nil {
		return nil, fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("User-Agent", c.userAgent)
	if c.hasAuth {
		req.SetBasicAuth(c.login, c.password)
	}
	resp, err := c.http.Do(req)
	var ue *url.Error
	if err != nil && errors.Is(err, ErrRedirectRefused) && errors.As(err, &ue) {
		return resp, ue.Err
	}
	return resp, err
}

// statusOf is the status of the response that came with an error from
// Client.Do (a refused redirect), or 0 when there was none.
func statusOf(resp *http.Response) int {
	if resp == nil {
		return 0
	}
	return resp.StatusCode
}

// checkStatus maps an HTTP status to the three outcomes.
func (c *Client) checkStatus(resp *http.Response, rel string) error {
	switch resp.StatusCode {
	case http.StatusOK:
		return nil
	case http.StatusNotFound, http.StatusGone, http.StatusForbidden:
		// S3 (and caches in front of it) answer 403 for a missing key when
		// listing is not allowed; treating it as a failure would turn every
		// miss on such a cache into a 503.
		return c.notFound(rel, resp.Status)
	default:
		// 5xx and 429 are the upstream being unwell; anything else (206, 3xx
		// left over after redirects, 401) is a response we cannot use. Both are
		// "could not answer", never "does not exist".
		return c.unavailable(resp.StatusCode, "GET %s: %s", rel, resp.Status)
	}
}

// explain replaces a bare "context canceled" by the reason this package
// cancelled (a timeout), and leaves the caller's own cancellation visible.
func (c *Client) explain(ctx context.Context, err error) error {
	if ctx.Err() == nil {
		return err
	}
	cause := context.Cause(ctx)
	if errors.Is(cause, ErrTimeout) {
		return cause
	}
	if cause != nil && !errors.Is(err, cause) {
		return fmt.Errorf("%w (%w)", err, cause)
	}
	return err
}

// httpBody enforces the idle timeout and the Content-Length of a download.
// Like any io.Reader it is not safe for concurrent Reads; Close may be called
// from another goroutine to abort a blocked Read.
type httpBody struct {
	c         *Client
	rel       string
	rc        io.ReadCloser
	ctx       context.Context
	cancel    context.CancelCauseFunc
	release   func() // gives back the connection slot; idempotent
	idleTimer *time.Timer
	want      int64 // Content-Length or -1
	got       int64
	status    int
	err       error // sticky: a failed download stays failed
	closeOnce sync.Once
	closeErr  error
}

func (b *httpBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	// The timer runs only while waiting on the upstream, so a slow consumer
	// (a client draining slowly) is not mistaken for a stalled upstream.
	b.idleTimer.Reset(b.c.timeout)
	n, err := b.rc.Read(p)
	b.idleTimer.Stop()
	b.got += int64(n)
	switch {
	case err == nil:
		return n, nil
	case err == io.EOF && (b.want < 0 || b.got >= b.want):
		b.err = io.EOF
		return n, io.EOF // unwrapped: io.Copy and friends compare with ==
	case err == io.EOF:
		// Go's transport already reports a short body as ErrUnexpectedEOF;
		// this catches other RoundTrippers that end cleanly too early.
		err = io.ErrUnexpectedEOF
	}
	b.err = b.c.unavailable(b.status, "GET %s: after %d of %s bytes: %w", b.rel, b.got, sizeText(b.want), b.c.explain(b.ctx, err))
	// Only a stall is evidence against the upstream: other read errors may
	// come from the consumer closing the body or cancelling its context.
	if errors.Is(context.Cause(b.ctx), ErrTimeout) {
		b.c.health.failure(b.err)
	}
	return n, b.err
}

func (b *httpBody) Close() error {
	b.closeOnce.Do(func() {
		b.idleTimer.Stop()
		b.closeErr = b.rc.Close()
		b.cancel(nil)
		b.release()
	})
	return b.closeErr
}

func sizeText(n int64) string {
	if n < 0 {
		return "unknown"
	}
	return fmt.Sprint(n)
}
