package gate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// Status is the kind of an answer; the HTTP layer maps each to one code.
type Status int

const (
	// Serve: the path is served now; Answer.Record says what.
	Serve Status = iota
	// Reject: the path is refused now; Decision and Detail say why.
	Reject
	// NotFound: no upstream has the path.
	NotFound
	// Unavailable: nothing was approved and an upstream failed
	// transiently, so the path might be served later. Never a 404, which
	// Nix would cache for an hour.
	Unavailable
)

// Answer is what a request for a path gets at this moment.
type Answer struct {
	Status   Status
	Record   *cache.Record // for Serve
	Decision string        // the X-Cacheproxy-Decision header, "" when there is none
	Detail   string        // one line for the response body
}

// answer turns an outcome into an Answer: the one place where "serve,
// 404 or 503" is decided.
func answer(out outcome) Answer {
	switch {
	case out.rec != nil:
		return Answer{Status: Serve, Record: out.rec, Decision: header(out.rec.Approved, out.rec.Reason)}
	case out.unavailable != nil:
		a := Answer{Status: Unavailable, Detail: oneLine("upstreams unavailable: " + out.unavailable.Error())}
		if out.decision != nil {
			a.Decision = out.decision.String()
		}
		return a
	case out.decision != nil:
		d := out.decision
		return Answer{Status: Reject, Decision: d.String(), Detail: oneLine(fmt.Sprintf("%s: %s", d, d.Detail))}
	}
	return Answer{Status: NotFound, Detail: "not found in any upstream"}
}

func header(approved bool, reason policy.Reason) string {
	return policy.Decision{Approved: approved, Reason: reason}.String()
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// NarInfo answers GET /<hash>.narinfo.
func (g *Gate) NarInfo(ctx context.Context, hash string) (Answer, error) {
	out, err := g.lookup(ctx, hash, "narinfo")
	if err != nil {
		return Answer{}, err
	}
	return answer(out), nil
}

// NAR answers a request for /nar/<file>. A client may hold the narinfo for
// 30 days, so a path without a stored decision is decided again (sharing
// the decision round with narinfo requests), never refused for that alone.
// The NAR is served only if the path is approved now and file is the one
// the current decision names; otherwise the answer is a counted, logged
// rejection.
func (g *Gate) NAR(ctx context.Context, file string) (Answer, error) {
	hash, ok := NarFileHash(file)
	if !ok {
		return Answer{}, fmt.Errorf("malformed NAR file name %q", file)
	}
	out, err := g.lookup(ctx, hash, "")
	if err != nil {
		return Answer{}, err
	}
	a := answer(out)
	if a.Status == Reject && out.remembered {
		// A fleet machine asking for the NAR of a refused path is worth a
		// line each time; a flood of narinfo requests is not.
		g.logRefusal(*out.decision, hash)
	}
	if a.Status != Serve || a.Record.NarFile == file {
		return a, nil
	}
	// A client holding a narinfo from before the recoded file existed asks
	// for the upstream's file; one holding a narinfo that named the recoded
	// file asks for it after a decision made again names the upstream's
	// (the recoded blob was evicted, or serve_compression was turned off).
	// Both are the same NAR, verified the same way.
	if upFile, _ := a.Record.UpstreamVariant(); upFile == file {
		a.Record = upstreamView(a.Record)
		return a, nil
	}
	if recodedName(a.Record) == file {
		a.Record = recodedView(a.Record)
		return a, nil
	}
	d := policy.Decision{Reason: policy.StaleNarInfo, Upstream: a.Record.Upstream,
		Detail: fmt.Sprintf("the current decision for %s names nar/%s, not nar/%s", a.Record.StorePath, a.Record.NarFile, file)}
	g.m.Decisions.WithLabelValues("rejected", string(policy.StaleNarInfo)).Inc()
	g.log.Warn("rejected", append(decisionAttrs(d, a.Record.StorePath), "served", false)...)
	return Answer{Status: Reject, Decision: d.String(), Detail: oneLine(d.String() + ": " + d.Detail)}, nil
}

// NarFileHash returns the store path hash a NAR file name starts with.
func NarFileHash(file string) (string, bool) {
	if strings.Contains(file, "/") || len(file) < narinfo.HashLen+1 || file[narinfo.HashLen] != '-' ||
		!narinfo.ValidHash(file[:narinfo.HashLen]) {
		return "", false
	}
	return file[:narinfo.HashLen], true
}

// Listing answers GET /<hash>.ls: a stream of the upstream's NAR listing
// of a path served now (the caller closes it), or the answer that refuses
// it.
func (g *Gate) Listing(ctx context.Context, hash string) (Answer, io.ReadCloser, error) {
	out, err := g.lookup(ctx, hash, "")
	if err != nil {
		return Answer{}, nil, err
	}
	a := answer(out)
	if a.Status != Serve {
		return a, nil, nil
	}
	u, ok := g.upstreamNamed(a.Record.Upstream)
	if !ok {
		return Answer{Status: NotFound, Detail: "upstream " + a.Record.Upstream + " is not configured"}, nil, nil
	}
	body, _, err := u.Client.Open(ctx, hash+".ls")
	return a, body, err
}

// BuildLog streams a build log from the first upstream that has it (the
// caller closes it). Logs are not substitutes: nothing of them reaches a
// store, and nothing of them is held in memory.
func (g *Gate) BuildLog(ctx context.Context, drv string) (io.ReadCloser, error) {
	var lastErr error
	for _, u := range g.conf().upstreams {
		body, _, err := u.Client.Open(ctx, path.Join("log", drv))
		if err == nil {
			return body, nil
		}
		if lastErr == nil || !errors.Is(err, upstream.ErrNotFound) {
			lastErr = err // an unavailable upstream might have it: say so
		}
	}
	return nil, lastErr
}
