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
// host, or containing "..". Credentials from the netrc file are sent only to
// the upstream's own host (Go's client drops them on cross-host redirects).
package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
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

// UnavailableError means the upstream could not answer: connection refused,
// timeout, 5xx, 429, a malformed or truncated response. It is transient:
// callers answer 503, never 404.
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

// DefaultTimeout applies when Options.Timeout is zero.
const DefaultTimeout = 30 * time.Second

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
}

// New creates a client for one upstream. It reads the netrc file once, here:
// credentials changes need a restart, like every other config change.
func New(o Options) (*Client, error) {
	u, err := url.Parse(o.URL)
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %w", o.URL, err)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("upstream %q: a cache root cannot have a query or fragment", o.URL)
	}
	if o.Timeout < 0 {
		return nil, fmt.Errorf("upstream %q: negative timeout %s", o.URL, o.Timeout)
	}
	c := &Client{
		name:      u.Redacted(), // Name is used in logs and metric labels: no passwords
		timeout:   o.Timeout,
		userAgent: o.UserAgent,
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
			return nil, fmt.Errorf("upstream %q: a file URL must name an absolute directory, like file:///srv/cache", o.URL)
		}
		c.dir = u.Path
		return c, nil
	case "http", "https":
		if u.Hostname() == "" {
			return nil, fmt.Errorf("upstream %q: missing host", o.URL)
		}
	default:
		return nil, fmt.Errorf("upstream %q: scheme must be http, https or file", o.URL)
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
		c.ownsTrans = newTransport()
		rt = c.ownsTrans
	}
	// No http.Client.Timeout: it would cap a whole NAR download. Deadlines
	// are per call, through contexts.
	c.http = &http.Client{Transport: rt}
	return c, nil
}

// newTransport is a pooled transport for one upstream. Each Client owns its
// own so one slow upstream cannot exhaust another's connections; many
// concurrent NAR and narinfo fetches go to the same host, hence the larger
// per-host idle pool than Go's default of 2.
func newTransport() *http.Transport {
	return &http.Transport{
		// Fleets behind a corporate proxy configure it like curl (and so Nix)
		// expects: through HTTP(S)_PROXY / NO_PROXY.
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          128,
		MaxIdleConnsPerHost:   32,
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
// timeouts, gives an *UnavailableError.
func (c *Client) Get(ctx context.Context, rel string, maxBytes int64) ([]byte, error) {
	ref, err := checkRel(rel)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", c.name, err)
	}
	if c.dir != "" {
		return c.getFile(ctx, rel, ref, maxBytes)
	}

	ctx, cancel := context.WithTimeoutCause(ctx, c.timeout,
		fmt.Errorf("no complete answer within %s: %w", c.timeout, ErrTimeout))
	defer cancel()
	resp, err := c.do(ctx, ref)
	if err != nil {
		return nil, c.unavailable(0, "GET %s: %w", rel, c.explain(ctx, err))
	}
	defer resp.Body.Close()
	if err := c.checkStatus(resp, rel); err != nil {
		return nil, err
	}
	if resp.ContentLength > maxBytes {
		return nil, c.unavailable(resp.StatusCode, "GET %s: %d bytes, limit %d: %w", rel, resp.ContentLength, maxBytes, ErrTooLarge)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBytes+1))
	if err != nil {
		return nil, c.unavailable(resp.StatusCode, "GET %s: reading body: %w", rel, c.explain(ctx, err))
	}
	if int64(len(body)) > maxBytes {
		return nil, c.unavailable(resp.StatusCode, "GET %s: more than %d bytes: %w", rel, maxBytes, ErrTooLarge)
	}
	return body, nil
}

// Open starts the download of a large file (a NAR) relative to the cache
// root. size is the Content-Length, or -1 when the upstream does not say.
// The body fails with an error wrapping ErrTimeout when the upstream sends
// nothing for Timeout (a stalled upstream is an error, not a hang), and with
// an error wrapping io.ErrUnexpectedEOF when it ends before Content-Length.
// Errors are classified as for Get; body read errors are *UnavailableError.
func (c *Client) Open(ctx context.Context, rel string) (body io.ReadCloser, size int64, err error) {
	ref, err := checkRel(rel)
	if err != nil {
		return nil, 0, fmt.Errorf("upstream %s: %w", c.name, err)
	}
	if c.dir != "" {
		return c.openFile(ctx, rel, ref)
	}

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
		cancel(nil)
		return nil, 0, c.unavailable(0, "GET %s: %w", rel, c.explain(ctx, err))
	}
	if err := c.checkStatus(resp, rel); err != nil {
		resp.Body.Close()
		cancel(nil)
		return nil, 0, err
	}
	b := &httpBody{
		c:      c,
		rel:    rel,
		rc:     resp.Body,
		ctx:    ctx,
		cancel: cancel,
		want:   resp.ContentLength,
		status: resp.StatusCode,
	}
	b.idleTimer = time.AfterFunc(c.timeout, func() {
		cancel(fmt.Errorf("no data for %s: %w", c.timeout, ErrTimeout))
	})
	b.idleTimer.Stop() // armed only while a Read waits
	return b, resp.ContentLength, nil
}

func (c *Client) do(ctx context.Context, ref *url.URL) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base.ResolveReference(ref).String(), nil)
	if err != nil {
		return nil, fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("User-Agent", c.userAgent)
	if c.hasAuth {
		req.SetBasicAuth(c.login, c.password)
	}
	return c.http.Do(req)
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
	idleTimer *time.Timer
	want      int64 // Content-Length or -1
	got       int64
	status    int
	err       error // sticky: a failed download stays failed
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
	return n, b.err
}

func (b *httpBody) Close() error {
	b.idleTimer.Stop()
	err := b.rc.Close()
	b.cancel(nil)
	return err
}

func sizeText(n int64) string {
	if n < 0 {
		return "unknown"
	}
	return fmt.Sprint(n)
}
