package gate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/narstream"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Body is the NAR of a served decision: a verified blob from the cache, or
// a reader of the one download in progress. The caller closes it.
type Body struct {
	Blob   *os.File          // cached and verified against exactly this decision
	Stream *narstream.Reader // verified as it streams; fails rather than end short
	Size   int64             // bytes the client gets, -1 when unknown
}

// Close releases the body.
func (b Body) Close() error {
	if b.Blob != nil {
		return b.Blob.Close()
	}
	if b.Stream != nil {
		return b.Stream.Close()
	}
	return nil
}

// Errors of OpenNAR.
var (
	// ErrQuarantined: the NAR failed verification since the decision was read.
	ErrQuarantined = errors.New("the NAR failed verification and is quarantined")
	// errCommitted: the blob appeared while joining.
	errCommitted = errors.New("committed meanwhile")
)

// OpenNAR returns the NAR of a served record: the cached blob if one was
// verified against exactly rec's expectations, otherwise a reader of the one
// upstream download (started if needed, unless download is false: then a
// Body with neither Blob nor Stream says that the NAR is not cached).
//
// A record that recodes (serve_compression) and names the upstream's file
// is served from a download that also writes the recoded file; one that
// names the recoded file is served from that file as the download writes
// it (its size is unknown until the download ends).
func (g *Gate) OpenNAR(ctx context.Context, rec *cache.Record, download bool) (Body, error) {
	size := rec.NAR.Size()
	recoded := rec.UpstreamFile != "" // NarFile is the recoded file
	if f, n := g.openBlob(rec); f != nil {
		g.m.CacheHits.WithLabelValues("nar").Inc()
		if rec.Recode && !recoded && download {
			g.recodeCached(rec)
		}
		return Body{Blob: f, Size: n}, nil
	}
	if !download {
		return Body{Size: size}, nil
	}
	g.m.CacheMisses.WithLabelValues("nar").Inc()
	upFile, upNAR := rec.UpstreamVariant()
	var job narstream.Job
	if recoded && g.blobs.Has(upFile) {
		job = g.localJob(rec, upFile, upNAR)
	} else {
		u, ok := g.upstreamNamed(rec.Upstream)
		if !ok {
			return Body{}, fmt.Errorf("upstream %s of %s is no longer configured", rec.Upstream, rec.StorePath)
		}
		job = g.upstreamJob(rec, u, upFile, upNAR)
	}
	if rec.Recode && (recoded || !g.promoteRecoded(rec)) {
		g.recodeJob(&job, rec)
	}
	admit := func() error {
		// Checked under the download table's lock: a download that just
		// ended has either committed its blob or written its quarantine.
		if g.blobs.Has(rec.NarFile) {
			return errCommitted
		}
		if err := g.DiskRoom(); err != nil {
			return err
		}
		if q, err := g.db.Quarantine(pathHash(rec)); err != nil || q != nil {
			return errors.Join(ErrQuarantined, err)
		}
		return nil
	}
	var r *narstream.Reader
	var err error
	if recoded {
		size = -1
		r, err = g.nars.JoinRecoded(ctx, job, admit)
	} else {
		r, err = g.nars.Join(ctx, job, admit)
	}
	switch {
	case errors.Is(err, errCommitted):
		if f, n := g.openBlob(rec); f != nil {
			return Body{Blob: f, Size: n}, nil
		}
		return Body{}, errors.New("the NAR was cached and evicted at once")
	case err != nil:
		return Body{}, err
	}
	return Body{Stream: r, Size: size}, nil
}

// upstreamJob is the download of a record's file from its upstream, kept
// as a blob once verified.
func (g *Gate) upstreamJob(rec *cache.Record, u Upstream, file string, e verify.Expect) narstream.Job {
	job := narstream.Job{
		Name:   file,
		Expect: e,
		Open: func(ctx context.Context) (io.ReadCloser, int64, error) {
			return u.Client.Open(ctx, rec.NarURL)
		},
		Temp: func() (*os.File, error) { return g.blobs.CreateTemp(file) },
		Commit: func(f *os.File) error {
			return g.blobs.Commit(f, file, cache.BlobMeta{StorePath: rec.StorePath, NAR: e})
		},
		Discard: g.blobs.Discard,
		Grow:    g.blobs.Grow,
		Finally: g.afterDownload,
	}
	start := time.Now()
	job.Done = func(written int64, err error) {
		g.m.UpstreamDuration.WithLabelValues(u.Name(), "nar").Observe(time.Since(start).Seconds())
		g.narDone(rec, u, file, written, err)
	}
	return job
}

// afterDownload evicts once a download's readers got their last bytes:
// its bbolt writes must not delay them.
func (g *Gate) afterDownload(err error) {
	if err != nil {
		return
	}
	if err := g.blobs.Evict(); err != nil {
		g.log.Error("evict blobs", "err", err)
	}
	g.m.CacheSize.Set(float64(g.blobs.Size()))
}

// openBlob opens rec's cached blob, and returns its size, if it was
// verified against exactly rec's expectations (for a recoded file: any
// zstd file of the NAR, see servesRecoded). A blob of the same name
// verified against another variant (another upstream's compression of the
// same NAR) is dropped: its bytes would not match the narinfo the client
// holds.
func (g *Gate) openBlob(rec *cache.Record) (*os.File, int64) {
	f, err := g.blobs.Open(rec.NarFile)
	if errors.Is(err, cache.ErrDamaged) {
		g.m.ScrubFailures.Inc()
		g.log.Error("cached blob damaged; dropped, will fetch again", "path", rec.StorePath, "err", err)
	}
	if err != nil {
		return nil, 0
	}
	meta, err := g.blobs.Meta(rec.NarFile)
	if err != nil || meta == nil || (meta.NAR != rec.NAR && !servesRecoded(rec, meta)) {
		f.Close()
		g.log.Warn("cached blob was verified against another narinfo; dropping it", "blob", rec.NarFile)
		g.blobs.Remove(rec.NarFile)
		return nil, 0
	}
	return f, meta.Size
}

// MaxAmbiguousTruncations is how many transfers of one NAR in a row may end
// short without any declared length before the shortness counts as the
// upstream's answer (nar_mismatch) rather than a network blip.
const MaxAmbiguousTruncations = 3

// narDone counts how a NAR download ended and quarantines the path when a
// complete transfer disagreed with the narinfo. It runs before any reader
// learns the result, so a client that retries at once finds the quarantine.
func (g *Gate) narDone(rec *cache.Record, u Upstream, file string, written int64, err error) {
	var ve *verify.Error
	var te *narstream.TruncatedError
	g.mu.Lock()
	if errors.As(err, &te) && te.UnknownLength != nil {
		g.shortRuns[file]++
		if g.shortRuns[file] >= MaxAmbiguousTruncations {
			err, te = te.UnknownLength, nil
		}
	}
	if te == nil {
		delete(g.shortRuns, file)
	}
	g.mu.Unlock()
	switch {
	case err == nil:
		g.m.UpstreamRequests.WithLabelValues(u.Name(), "nar", "found").Inc()
		g.log.Info("NAR verified and cached", narAttrs(rec, u.Name(), written, narVerified, "")...)
	case te != nil:
		g.m.VerifyFailures.WithLabelValues(string(verify.CheckTruncated)).Inc()
		g.m.UpstreamRequests.WithLabelValues(u.Name(), "nar", "truncated").Inc()
		g.log.Warn("NAR transfer broken; will retry on next request", narAttrs(rec, u.Name(), written, narTruncated, err.Error())...)
	case errors.As(err, &ve):
		g.m.VerifyFailures.WithLabelValues(string(ve.Check)).Inc()
		g.m.UpstreamRequests.WithLabelValues(u.Name(), "nar", "mismatch").Inc()
		g.m.Decisions.WithLabelValues("rejected", string(policy.NarMismatch)).Inc()
		g.log.Error("NAR failed verification; path quarantined",
			append(narAttrs(rec, u.Name(), written, narMismatch, string(ve.Check)), "detail", ve.Detail)...)
		q := policy.Quarantine{StorePath: rec.StorePath, Check: string(ve.Check), Detail: ve.Detail, Upstream: u.Name(), Time: g.now()}
		if err := g.ev.PutQuarantine(pathHash(rec), q); err != nil {
			g.log.Error("quarantine", "path", rec.StorePath, "err", err)
		}
		g.db.RecordRejection(cache.Rejection{StorePath: rec.StorePath, Reason: string(policy.NarMismatch), Detail: ve.Error(), Upstream: u.Name(), Last: g.now()})
	default:
		g.m.UpstreamRequests.WithLabelValues(u.Name(), "nar", "unavailable").Inc()
		g.log.Warn("NAR fetch failed", narAttrs(rec, u.Name(), written, narUnavailable, err.Error())...)
	}
}

// pathHash is the store path hash of a record.
func pathHash(rec *cache.Record) string { return rec.NarFile[:narinfo.HashLen] }

// Scrub re-hashes every cached blob, paced so that a whole pass takes
// about period, and drops and counts those that fail. It runs until ctx
// ends.
func (g *Gate) Scrub(ctx context.Context, period time.Duration) {
	for {
		names := g.blobs.Names()
		total := g.blobs.Size()
		start := time.Now()
		for _, name := range names {
			n, failed, err := g.blobs.Check(name)
			if err != nil {
				g.log.Error("scrub", "blob", name, "err", err)
			}
			if failed != nil {
				g.m.ScrubFailures.Inc()
				g.log.Error("cached blob failed verification; dropped", "blob", failed.Blob, "path", failed.StorePath, "err", failed.Error)
			}
			// Sleep this blob's share of the period.
			wait := time.Duration(0)
			if total > 0 {
				wait = time.Duration(float64(period) * float64(n) / float64(total))
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		g.m.CacheSize.Set(float64(g.blobs.Size()))
		// An empty or small cache waits out the rest of the period.
		select {
		case <-ctx.Done():
			return
		case <-time.After(max(period-time.Since(start), time.Second)):
		}
	}
}
