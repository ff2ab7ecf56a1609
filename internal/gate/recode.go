package gate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/narstream"
	"github.com/cacheproxy/cacheproxy/internal/verify"
	"github.com/cacheproxy/cacheproxy/internal/weakpool"
)

// serve_compression = "zstd": every served NAR goes to clients as zstd,
// which Nix decodes about ten times faster than xz. The first download of
// a NAR re-encodes the verified NAR bytes as they stream (narstream's
// Recode) into a second file, committed as the blob <hash>-<NarHash>.nar.zst
// once the NAR verified. Until then the stored narinfo names the upstream's
// file; the commit rewrites it (Compression, URL, FileHash, FileSize: none
// of them in the fingerprint, so every signature stays valid). The
// upstream's file name stays servable for clients holding the older
// narinfo.

// recodeWindow is the zstd window: the one Nix's own zstd (libzstd's
// default level) writes. It bounds the encoder's history and every
// client decoder's window: with 8 MiB the peak memory of a cold recoding
// rollout was 118 MiB, with 2 MiB 81 MiB, and the recoded blobs of
// bench/fleet.sh's corpus came out the same size (292 MB).
const recodeWindow = 2 << 20

// encoders keeps zstd encoders between downloads: each holds MiBs of
// tables and history, and a fleet rollout recodes many NARs one after the
// other. Idle ones are held weakly (weakpool): a sync.Pool kept idle
// encoders as live heap, and the collector's headroom doubled them in the
// server's peak memory (a cold recoding rollout of bench/fleet.sh peaked at
// 136 MiB with a sync.Pool, 118 MiB with this, both with 8 MiB windows).
type encoders struct{ idle weakpool.Pool[zstd.Encoder] }

// get returns an encoder writing a zstd stream to w; closing it ends the
// stream and offers the encoder for reuse. One that is dropped unclosed
// (a failed download) is left to the garbage collector.
func (e *encoders) get(w io.Writer) io.WriteCloser {
	enc := e.idle.Get()
	if enc == nil {
		// Concurrency 1: the encoder works synchronously in the caller's
		// goroutine (the verifier's decoder), one block at a time.
		// Lower memory: the history grows with the stream instead of being
		// allocated whole (same output).
		var err error
		enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault),
			zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(recodeWindow), zstd.WithLowerEncoderMem(true))
		if err != nil {
			panic(fmt.Sprintf("zstd encoder options: %v", err)) // constant options
		}
	}
	enc.Reset(w)
	return &pooledEncoder{enc: enc, idle: &e.idle}
}

type pooledEncoder struct {
	enc  *zstd.Encoder
	idle *weakpool.Pool[zstd.Encoder]
}

func (p *pooledEncoder) Write(b []byte) (int, error) { return p.enc.Write(b) }

func (p *pooledEncoder) Close() error {
	err := p.enc.Close()
	p.enc.Reset(nil) // drop the reference to the file
	if err == nil {
		p.idle.Put(p.enc)
	}
	return err
}

// recodedName is the name of the zstd file of a record's NAR.
func recodedName(rec *cache.Record) string {
	_, up := rec.UpstreamVariant()
	return pathHash(rec) + "-" + up.NarHash.Nix32() + ".nar" + narinfo.CompressionZstd.Ext()
}

// sameNAR reports whether two expectations are about the same NAR, whatever
// file carries it.
func sameNAR(a, b verify.Expect) bool {
	return a.NarHash == b.NarHash && a.NarSize == b.NarSize && a.Flat == b.Flat
}

// recodedExpect is what the recoded file of up's NAR is, with its hash and
// size when known.
func recodedExpect(up verify.Expect, sum narinfo.SHA256, size uint64) verify.Expect {
	return verify.Expect{Compression: narinfo.CompressionZstd, FileHash: sum, FileSize: size,
		NarHash: up.NarHash, NarSize: up.NarSize, Flat: up.Flat}
}

// recodedView is a record seen as serving its recoded file, for a request
// of that file before the stored narinfo names it (or when the stored
// decision does not recode at all): its FileHash and FileSize are not
// known, and any verified zstd file of the NAR will do.
func recodedView(rec *cache.Record) *cache.Record {
	v := *rec
	v.UpstreamFile, v.UpstreamNAR = rec.UpstreamVariant()
	v.NarFile, v.NAR = recodedName(rec), recodedExpect(v.UpstreamNAR, narinfo.SHA256{}, 0)
	v.Recode = true
	return &v
}

// upstreamView is a record seen as serving the upstream's file: the client
// holds a narinfo from before the recoded file existed.
func upstreamView(rec *cache.Record) *cache.Record {
	v := *rec
	v.NarFile, v.NAR = rec.UpstreamVariant()
	v.UpstreamFile, v.UpstreamNAR = "", verify.Expect{}
	v.Recode = false // the normal verified fetch of the upstream's file
	return &v
}

// servesRecoded reports whether a cached blob may be served for rec's
// recoded file: a verified zstd file of the same NAR. Its FileHash may
// differ from the narinfo's (a file recoded again after an eviction by
// another encoder version); Nix checks the NarHash, not the FileHash.
func servesRecoded(rec *cache.Record, meta *cache.BlobMeta) bool {
	return rec.UpstreamFile != "" && meta.NAR.Compression == narinfo.CompressionZstd && sameNAR(meta.NAR, rec.NAR)
}

// withRecoded turns a new record into one that names the recoded file, if
// a verified one is cached: a decision made again (after an admin change
// or a restart) serves zstd at once.
func (g *Gate) withRecoded(rec *cache.Record, ni *narinfo.NarInfo) {
	name := recodedName(rec)
	meta, err := g.blobs.Meta(name)
	if err != nil || meta == nil || meta.NAR.Compression != narinfo.CompressionZstd || !sameNAR(meta.NAR, rec.NAR) ||
		meta.NAR.FileHash.IsZero() {
		return
	}
	rec.UpstreamFile, rec.UpstreamNAR = rec.NarFile, rec.NAR
	rec.NarFile, rec.NAR = name, recodedExpect(rec.NAR, meta.NAR.FileHash, meta.NAR.FileSize)
	setServedFile(ni, rec)
}

// setServedFile makes a narinfo name rec's NAR file.
func setServedFile(ni *narinfo.NarInfo, rec *cache.Record) {
	ni.URL = "nar/" + rec.NarFile
	ni.Compression = rec.NAR.Compression
	ni.FileHash, ni.FileSize = rec.NAR.FileHash, rec.NAR.FileSize
}

// recodeJob makes job, a download of rec's upstream file, also write the
// recoded file. The upstream's bytes are only passed through to their
// readers, not kept.
func (g *Gate) recodeJob(job *narstream.Job, rec *cache.Record) {
	name := recodedName(rec)
	job.Commit = func(f *os.File) error { g.blobs.Discard(f); return nil }
	job.Recode = &narstream.Recode{
		Encoder: g.encoders.get,
		Temp:    func() (*os.File, error) { return g.blobs.CreateTemp(name) },
		Commit: func(f *os.File, sum narinfo.SHA256, size int64) error {
			return g.commitRecoded(rec, f, name, sum, uint64(size))
		},
		Discard: g.blobs.Discard,
	}
}

// commitRecoded makes a verified recoded file a blob and has the stored
// decision name it.
func (g *Gate) commitRecoded(rec *cache.Record, f *os.File, name string, sum narinfo.SHA256, size uint64) error {
	_, upNAR := rec.UpstreamVariant()
	e := recodedExpect(upNAR, sum, size)
	if err := g.blobs.Commit(f, name, cache.BlobMeta{StorePath: rec.StorePath, NAR: e}); err != nil {
		return err
	}
	g.nameRecoded(rec, name, e)
	return nil
}

// nameRecoded has the stored decision of rec name its recoded file, if
// that decision still recodes the same upstream file. A failure is logged:
// the narinfo then keeps naming the upstream's file, which is served as
// before.
func (g *Gate) nameRecoded(rec *cache.Record, name string, e verify.Expect) {
	upFile, upNAR := rec.UpstreamVariant()
	hash := pathHash(rec)
	updated, err := g.db.UpdateRecord(hash, func(r *cache.Record) bool {
		if f, n := r.UpstreamVariant(); !r.Recode || f != upFile || n != upNAR || (r.NarFile == name && r.NAR == e) {
			return false // decided again meanwhile (and found the blob, or does not recode), or done
		}
		ni, err := narinfo.Parse(r.NarInfo, g.conf().policy.StoreDir)
		if err != nil {
			g.log.Error("stored narinfo does not parse", "path", r.StorePath, "err", err)
			return false
		}
		r.UpstreamFile, r.UpstreamNAR = upFile, upNAR
		r.NarFile, r.NAR = name, e
		setServedFile(ni, r)
		r.NarInfo = ni.Marshal()
		return true
	})
	if err != nil {
		g.log.Error("recoded NAR cached, narinfo not updated", "path", rec.StorePath, "err", err)
		return
	}
	if updated {
		g.hot.drop([]string{hash})
		g.log.Info("NAR recoded to zstd", "path", rec.StorePath, "from", upNAR.Compression, "file_size", e.FileSize, "nar_size", upNAR.NarSize)
	}
}

// promoteRecoded has a decision that still names the upstream's file name
// the recoded one, if it is cached (a decision stored while the recoded
// file was being committed). It reports whether the recoded file is cached.
func (g *Gate) promoteRecoded(rec *cache.Record) bool {
	name := recodedName(rec)
	meta, err := g.blobs.Meta(name)
	if err != nil || meta == nil {
		return false
	}
	if meta.NAR.Compression == narinfo.CompressionZstd && sameNAR(meta.NAR, rec.NAR) && !meta.NAR.FileHash.IsZero() {
		g.nameRecoded(rec, name, meta.NAR)
	}
	return true
}

// recodeCached recodes rec's upstream file from its cached blob, in the
// background: the path was cached before serve_compression was set, and
// its clients get zstd from the next narinfo on.
func (g *Gate) recodeCached(rec *cache.Record) {
	upFile, upNAR := rec.UpstreamVariant()
	name := recodedName(rec)
	if g.promoteRecoded(rec) || g.nars.Running(upFile) {
		return
	}
	job := g.localJob(rec, upFile, upNAR)
	g.recodeJob(&job, rec)
	r, err := g.nars.JoinRecoded(context.Background(), job, func() error {
		if g.blobs.Has(name) {
			return errCommitted
		}
		return g.DiskRoom()
	})
	if err != nil {
		if !errors.Is(err, errCommitted) && !errors.Is(err, narstream.ErrOtherVariant) {
			g.log.Warn("recode cached NAR", "path", rec.StorePath, "err", err)
		}
		return
	}
	r.Close() // nobody reads it; the download goes on
}

// localJob is a download of a cached blob (to recode it): no upstream is
// asked, and a blob that fails verification is dropped, not quarantined.
func (g *Gate) localJob(rec *cache.Record, file string, e verify.Expect) narstream.Job {
	return narstream.Job{
		Name:   file,
		Expect: e,
		Open: func(context.Context) (io.ReadCloser, int64, error) {
			f, err := g.blobs.Open(file)
			if err != nil {
				return nil, 0, err
			}
			st, err := f.Stat()
			if err != nil {
				f.Close()
				return nil, 0, err
			}
			return f, st.Size(), nil
		},
		Grow: g.blobs.Grow,
		Done: func(_ int64, err error) {
			var ve *verify.Error
			if errors.As(err, &ve) {
				g.m.ScrubFailures.Inc()
				g.log.Error("cached blob failed verification while recoding; dropped", "blob", file, "path", rec.StorePath, "err", err)
				g.blobs.Remove(file)
			} else if err != nil {
				g.log.Warn("recode cached NAR", "path", rec.StorePath, "err", err)
			}
		},
		Finally: g.afterDownload,
	}
}
