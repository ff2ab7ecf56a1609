package server

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// Limits bound what clients can hold of the server: time for each phase of
// a request and the number of connections per listener.
type Limits struct {
	ReadHeader time.Duration // to send the request headers
	ReadBody   time.Duration // to send the whole request (admin bodies)
	Write      time.Duration // without progress while a response is written
	Idle       time.Duration // a keep-alive connection with no request
	// MaxConns caps the connections a listener serves. Beyond it, Headroom
	// more are accepted to answer /healthz (and 503 with Retry-After for
	// everything else), so that a saturated listener still tells its load
	// balancer and its operator why.
	MaxConns, Headroom int
	// MinRate is the slowest a client may read a cached NAR, in bytes per
	// second: a write deadline of Write plus size/MinRate bounds how long a
	// stalled reader holds its connection and file.
	MinRate int64
}

// DefaultLimits are the limits of the main listener; the admin listener
// gets the same timeouts with AdminMaxConns connections.
func DefaultLimits() Limits {
	return Limits{
		ReadHeader: 10 * time.Second,
		ReadBody:   60 * time.Second,
		Write:      60 * time.Second,
		Idle:       90 * time.Second,
		MaxConns:   4096,
		Headroom:   64,
		MinRate:    16 << 10,
	}
}

// AdminMaxConns caps the admin listener's connections.
const AdminMaxConns = 64

// limitListener accepts at most max+headroom connections at once; those
// accepted beyond max are marked as overflow.
type limitListener struct {
	net.Listener
	max, headroom int

	mu     sync.Mutex
	active int
	freed  chan struct{} // signalled when a connection closes
}

func newLimitListener(l net.Listener, max, headroom int) *limitListener {
	return &limitListener{Listener: l, max: max, headroom: headroom, freed: make(chan struct{}, 1)}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		l.mu.Lock()
		full := l.active >= l.max+l.headroom
		l.mu.Unlock()
		if !full {
			break
		}
		<-l.freed // wait for a slot rather than accept and drop
	}
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.active++
	overflow := l.active > l.max
	l.mu.Unlock()
	return &limitedConn{Conn: c, l: l, overflow: overflow}, nil
}

type limitedConn struct {
	net.Conn
	l        *limitListener
	overflow bool
	once     sync.Once
}

// ReadFrom keeps cached NARs on sendfile: net/http sends a file body
// through the connection's io.ReaderFrom (*net.TCPConn's is sendfile), and
// an embedded net.Conn does not promote it. Without this every cached NAR
// went through user space in 32 KiB writes.
func (c *limitedConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.active--
		c.l.mu.Unlock()
		select {
		case c.l.freed <- struct{}{}:
		default:
		}
	})
	return err
}

type overflowKey struct{}

// connContext marks requests that arrive on an overflow connection.
func connContext(ctx context.Context, c net.Conn) context.Context {
	if lc, ok := c.(*limitedConn); ok && lc.overflow {
		return context.WithValue(ctx, overflowKey{}, true)
	}
	return ctx
}

// overflowGuard answers requests on overflow connections: /healthz as
// usual, anything else 503, and the connection is closed afterwards.
func overflowGuard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Context().Value(overflowKey{}) == nil {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Connection", "close")
		if r.URL.Path == "/healthz" {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, "too many connections", http.StatusServiceUnavailable)
	})
}

// httpServer is an http.Server with the limits' timeouts. Writes get
// their deadline per response (see extendWrite).
func (lim Limits) httpServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           overflowGuard(h),
		ReadHeaderTimeout: lim.ReadHeader,
		ReadTimeout:       lim.ReadBody,
		IdleTimeout:       lim.Idle,
		ConnContext:       connContext,
	}
}

// extendWrite gives the response d more time to be written.
func extendWrite(w http.ResponseWriter, d time.Duration) {
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d))
}
