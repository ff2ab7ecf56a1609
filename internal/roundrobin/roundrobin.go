// Package roundrobin is a minimal HTTP load balancer for tests, standing
// in for the one a fleet puts in front of several cacheproxy nodes. It
// behaves like nginx with proxy_next_upstream error and proxy_buffering
// off: requests go round-robin over the backends that are up, a backend
// that refuses the connection or drops it before any response byte is
// skipped for the next one, and bodies stream through without being
// buffered, so a NAR of any size flows as the backend sends it.
//
// A response that has started is never retried: when a backend dies in the
// middle of a body, the client's connection is cut, as a real load balancer
// does, so the client sees a failed transfer rather than a short one.
package roundrobin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
	"time"
)

// LB is a running load balancer on a loopback httptest server.
type LB struct {
	// URL is the balancer's base URL, "http://127.0.0.1:PORT".
	URL string

	srv       *httptest.Server
	transport *http.Transport
	backends  []*backend
	next      atomic.Uint64
}

type backend struct {
	url      *url.URL
	down     atomic.Bool
	requests atomic.Int64
	failures atomic.Int64
}

// New starts a balancer over backends, base URLs such as
// "http://127.0.0.1:8080" (their paths are ignored: requests keep theirs).
// It panics on a malformed URL, as httptest does on setup errors. Close it
// when done.
func New(backends []string) *LB {
	lb := &LB{
		// A transport of its own: no proxy from the environment, no
		// transparent gzip (which would change the bytes the client
		// sees), and idle connections enough for a load test.
		transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			DisableCompression:  true,
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     30 * time.Second,
		},
	}
	for _, s := range backends {
		u, err := url.Parse(s)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			panic(fmt.Sprintf("roundrobin: bad backend URL %q", s))
		}
		lb.backends = append(lb.backends, &backend{url: u})
	}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			// The transport picks the backend per attempt; a real
			// balancer tells the backend who the client was.
			pr.SetXForwarded()
		},
		Transport: (*pickingTransport)(lb),
		// Flush after every write: without it the last bytes of a
		// slow backend's write could sit in the server's buffer.
		FlushInterval: -1,
		ErrorHandler:  lb.fail,
	}
	lb.srv = httptest.NewServer(proxy)
	lb.URL = lb.srv.URL
	return lb
}

// Close stops the balancer and closes its connections to the backends.
func (lb *LB) Close() {
	lb.srv.CloseClientConnections()
	lb.srv.Close()
	lb.transport.CloseIdleConnections()
}

// SetDown takes backend i out of the rotation (down) or puts it back, as
// an operator draining a node does.
func (lb *LB) SetDown(i int, down bool) { lb.backends[i].down.Store(down) }

// Requests is the number of requests backend i answered (a response
// header arrived from it), whatever the status.
func (lb *LB) Requests(i int) int64 { return lb.backends[i].requests.Load() }

// Failures is the number of attempts on backend i that failed before a
// response: refused or dropped connections.
func (lb *LB) Failures(i int) int64 { return lb.backends[i].failures.Load() }

// ErrNoBackend is returned (as 502) when every backend is down.
var ErrNoBackend = errors.New("roundrobin: no backend is up")

// pickingTransport is the LB seen as the ReverseProxy's transport: it
// chooses the backend for each attempt and moves on after a connection
// error.
type pickingTransport LB

func (pt *pickingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	lb := (*LB)(pt)
	var up []*backend
	for _, b := range lb.backends {
		if !b.down.Load() {
			up = append(up, b)
		}
	}
	if len(up) == 0 {
		return nil, ErrNoBackend
	}
	// Rotate over the backends that are up, so a drained backend's share
	// spreads evenly instead of falling to its neighbour.
	start := lb.next.Add(1) - 1
	var lastErr error
	for k := range up {
		b := up[(start+uint64(k))%uint64(len(up))]
		out := req.Clone(req.Context())
		out.URL.Scheme = b.url.Scheme
		out.URL.Host = b.url.Host
		out.Host = "" // the backend's host, as nginx's default $proxy_host
		if req.Body != nil && req.Body != http.NoBody {
			// The transport closes the body it is given even when the
			// dial fails; the next attempt must still be able to read
			// it. The server closes the real body when the request ends.
			out.Body = io.NopCloser(req.Body)
		}
		resp, err := lb.transport.RoundTrip(out)
		if err == nil {
			b.requests.Add(1)
			return resp, nil
		}
		b.failures.Add(1)
		lastErr = fmt.Errorf("backend %s: %w", b.url.Host, err)
		if !retryable(req, err) {
			break
		}
	}
	return nil, lastErr
}

// retryable reports whether a request that failed with err before any
// response may go to the next backend. A refused connection never reached
// a backend, so any request may move on; a connection dropped after the
// request was sent may be retried only for an idempotent request without a
// body, as nginx does for non-idempotent methods (POST, PATCH, LOCK) since
// 1.9.13, and because a sent body cannot be sent again.
func retryable(req *http.Request, err error) bool {
	if req.Context().Err() != nil {
		return false // the client gave up
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	switch req.Method {
	case http.MethodPost, http.MethodPatch, "LOCK":
		return false
	}
	return req.Body == nil || req.Body == http.NoBody
}

// fail answers a request no backend could take with 502, or nothing when
// the client has gone.
func (lb *LB) fail(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, context.Canceled) || r.Context().Err() != nil {
		return
	}
	http.Error(w, "roundrobin: "+err.Error(), http.StatusBadGateway)
}
