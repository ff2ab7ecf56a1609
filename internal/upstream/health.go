package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"sync"
	"time"
)

// probePath is what a down upstream is probed with: every binary cache
// serves it, and it is tiny.
const probePath = "nix-cache-info"

// verdict is what one finished request says about the upstream's health.
type verdict int

const (
	// noVerdict: nothing was asked of the upstream (refused path, local
	// check), so nothing was learnt.
	noVerdict verdict = iota
	// answered: the upstream responded (any status below 500, even a 404,
	// an HTML page or a redirect we refused), so it is reachable.
	answered
	// failing: no response, a timeout, a 5xx or a broken body.
	failing
)

func statusVerdict(code int) verdict {
	if code >= 500 {
		return failing
	}
	return answered
}

// transportVerdict classifies an error from Client.Do. A refused redirect
// came with a response; every other error means no usable answer.
func transportVerdict(err error) verdict {
	if errors.Is(err, ErrRedirectRefused) {
		return answered
	}
	return failing
}

// health decides whether the upstream is up. While it is down, requests
// fail at once with ErrDown, except that the first request after each
// backoff period probes nix-cache-info (so a black-holed upstream costs one
// timeout per period rather than one per request).
type health struct {
	downAfter  int
	minBackoff time.Duration
	maxBackoff time.Duration
	onChange   func(up bool)
	now        func() time.Time // time.Now; replaced by tests

	mu        sync.Mutex
	failures  int   // consecutive
	lastErr   error // the latest failure, for the ErrDown message
	down      bool
	backoff   time.Duration // the current period while down
	nextProbe time.Time
	probing   bool

	// notifyMu orders onChange calls; notifiedUp is the state last passed.
	notifyMu   sync.Mutex
	notifiedUp bool
}

func (h *health) up() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return !h.down
}

// success records an answer: the failure streak ends and a down upstream
// is up again.
func (h *health) success() {
	h.mu.Lock()
	h.failures = 0
	changed := h.down
	h.down = false
	h.mu.Unlock()
	if changed {
		h.notify()
	}
}

// failure records one failed request; the downAfter-th in a row marks the
// upstream down and schedules the first probe.
func (h *health) failure(err error) {
	h.mu.Lock()
	h.failures++
	h.lastErr = err
	changed := false
	if !h.down && h.failures >= h.downAfter {
		h.down, changed = true, true
		h.backoff = h.minBackoff
		h.nextProbe = h.now().Add(h.backoff)
	}
	h.mu.Unlock()
	if changed {
		h.notify()
	}
}

// probed records a probe's outcome (err nil: the upstream answered).
func (h *health) probed(err error) {
	h.mu.Lock()
	h.probing = false
	if err == nil || !h.down {
		// An answer, or a request that finished meanwhile already brought
		// the upstream back: an ordinary outcome.
		h.mu.Unlock()
		if err == nil {
			h.success()
		} else {
			h.failure(err)
		}
		return
	}
	h.failures++
	h.lastErr = err
	h.backoff = min(2*h.backoff, h.maxBackoff)
	h.nextProbe = h.now().Add(h.backoff)
	h.mu.Unlock()
}

// notify passes the current state to onChange unless it was the last one
// passed. Reading the state under notifyMu, rather than passing the
// transition that triggered the call, keeps racing transitions from
// delivering "down" after "up" when the upstream is in fact up.
func (h *health) notify() {
	if h.onChange == nil {
		return
	}
	h.notifyMu.Lock()
	defer h.notifyMu.Unlock()
	up := h.up()
	if up == h.notifiedUp {
		return
	}
	h.notifiedUp = up
	h.onChange(up)
}

// Up reports whether the upstream is considered reachable: false after
// Options.DownAfter consecutive failures (no answer, timeouts, 5xx; never
// a 404 or the caller's cancellation), true again after any answer.
func (c *Client) Up() bool { return c.health.up() }

// record feeds a request's verdict to the health state. A failure while the
// caller's context is done is not counted: the caller giving up says
// nothing about the upstream.
func (c *Client) record(ctx context.Context, v verdict, err error) {
	switch v {
	case answered:
		c.health.success()
	case failing:
		if ctx.Err() == nil {
			c.health.failure(err)
		}
	}
}

// admit lets a request through unless the upstream is down. The first
// request after a backoff period runs the probe and waits for it; others
// fail at once. The probe runs on its own context so that it completes and
// counts even when the request that started it gives up.
//
// A file:// upstream is never refused: a missing directory fails in a
// syscall, not a timeout, and each request finds a remount at once. Its
// state is still tracked for Up and OnStateChange.
func (c *Client) admit(ctx context.Context, rel string) error {
	if c.dir != "" {
		return nil
	}
	h := &c.health
	h.mu.Lock()
	if !h.down {
		h.mu.Unlock()
		return nil
	}
	start := !h.probing && !h.now().Before(h.nextProbe)
	h.probing = h.probing || start
	h.mu.Unlock()
	if !start {
		return c.downError(rel)
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		c.health.probed(c.probe())
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return c.unavailable(0, "GET %s: waiting for the health probe: %w", rel, context.Cause(ctx))
	}
	if !c.Up() {
		return c.downError(rel)
	}
	return nil
}

// stillUp fails a request that waited for a connection slot while the
// upstream was marked down: the requests ahead of it timed out, and it
// would too. (Many wait at once when every narinfo decision asks every
// upstream and a later one black-holes.) The probe is left to admit.
func (c *Client) stillUp(rel string) error {
	if c.dir != "" || c.Up() {
		return nil
	}
	return c.downError(rel)
}

func (c *Client) downError(rel string) error {
	h := &c.health
	h.mu.Lock()
	failures, last, probing := h.failures, h.lastErr, h.probing
	wait := h.nextProbe.Sub(h.now()).Round(time.Millisecond)
	h.mu.Unlock()
	next := "a probe is under way"
	if !probing {
		next = fmt.Sprintf("next probe in %s", max(wait, 0))
	}
	// The last failure is quoted, not wrapped: this error is about the
	// state, and must not also match (say) ErrTimeout for a request that
	// never waited.
	var u *UnavailableError
	if errors.As(last, &u) {
		last = u.Err
	}
	return c.unavailable(0, "GET %s: %w after %d consecutive failures, %s; last failure: %v", rel, ErrDown, failures, next, last)
}

// probe asks for nix-cache-info and returns nil when the upstream answered
// (any status below 500: a cache without nix-cache-info is still up).
func (c *Client) probe() error {
	ctx, cancel := context.WithTimeoutCause(context.Background(), c.timeout,
		fmt.Errorf("no answer to the probe within %s: %w", c.timeout, ErrTimeout))
	defer cancel()
	release, err := c.acquire(ctx, probePath)
	if err != nil {
		return err
	}
	defer release()
	resp, err := c.do(ctx, &url.URL{Path: probePath})
	if err != nil {
		if transportVerdict(err) == answered {
			return nil
		}
		return c.unavailable(0, "probe GET %s: %w", probePath, c.explain(ctx, err))
	}
	defer resp.Body.Close()
	// Read the (small) body so the connection can be reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if statusVerdict(resp.StatusCode) == failing {
		return c.unavailable(resp.StatusCode, "probe GET %s: %s", probePath, resp.Status)
	}
	return nil
}

// acquire takes one of the MaxConnections slots, waiting for as long as ctx
// allows. The returned release is idempotent.
func (c *Client) acquire(ctx context.Context, rel string) (release func(), err error) {
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, c.unavailable(0, "GET %s: waiting for one of %d connection slots: %w", rel, cap(c.slots), context.Cause(ctx))
	}
	var once sync.Once
	return func() { once.Do(func() { <-c.slots }) }, nil
}
