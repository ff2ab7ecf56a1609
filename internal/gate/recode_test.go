package gate

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"os/exec"
	"path"
	"slices"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/cacheproxy/cacheproxy/internal/metrics"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// recodeFixture is a fixture whose gate serves every NAR as zstd.
func recodeFixture(t *testing.T) *fixture {
	f := newFixture(t, false)
	f.g.Close()
	g, err := New(Options{Policy: f.g.conf().policy, Upstreams: f.g.conf().upstreams, Key: f.g.key, DB: f.db, Blobs: f.blobs,
		Metrics: metrics.New(), Log: f.g.log, ServeCompression: narinfo.CompressionZstd})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	f.g = g
	return f
}

// compressedObj is a store path of about 300 KiB of compressible NAR that
// the upstream publishes in compression c (made by the real tool).
func compressedObj(t *testing.T, name string, c narinfo.Compression) *obj {
	o := newObj(name)
	words := []string{"lib", "bin", "share", "nix", "store", "ELF", "\x00\x00\x00\x00"}
	rng := rand.New(rand.NewSource(1))
	var nar bytes.Buffer
	for nar.Len() < 300<<10 {
		nar.WriteString(words[rng.Intn(len(words))])
		nar.WriteByte(byte(rng.Intn(256)))
	}
	o.nar = nar.Bytes()
	o.ni.NarHash, o.ni.NarSize = narinfo.SumSHA256(o.nar), uint64(len(o.nar))
	o.file = o.nar
	if c != narinfo.CompressionNone {
		cmd := exec.Command(string(c), "-c")
		cmd.Stdin = bytes.NewReader(o.nar)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v", c, err)
		}
		o.file = out
	}
	o.ni.Compression = c
	o.ni.FileHash, o.ni.FileSize = narinfo.SumSHA256(o.file), uint64(len(o.file))
	o.ni.URL = "nar/" + o.ni.FileHash.Nix32() + ".nar" + c.Ext()
	return o
}

func parseNarInfo(t *testing.T, a Answer) *narinfo.NarInfo {
	t.Helper()
	if a.Status != Serve {
		t.Fatalf("status %d %s", a.Status, a.Detail)
	}
	ni, err := narinfo.Parse(a.Record.NarInfo, storeDir)
	if err != nil {
		t.Fatal(err)
	}
	return ni
}

// fetch reads the NAR file a client asks for, as the NAR route serves it.
func (f *fixture) fetch(file string) ([]byte, Body, error) {
	f.t.Helper()
	a := f.nar(file)
	wantAnswer(f.t, "NAR "+file, a, Serve, "approved; reason=attested")
	body, err := f.g.OpenNAR(context.Background(), a.Record, true)
	if err != nil {
		f.t.Fatal(err)
	}
	defer body.Close()
	var r io.Reader = body.Blob
	if body.Stream != nil {
		r = body.Stream
	}
	b, err := io.ReadAll(r)
	// The client gets the tail once the NAR verified; its files are stored
	// just after. The tests look at what was stored.
	f.g.Flush()
	return b, body, err
}

func unzstd(t *testing.T, b []byte) []byte {
	t.Helper()
	d, err := zstd.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	out, err := io.ReadAll(d)
	if err != nil {
		t.Fatalf("served zstd does not decode: %v", err)
	}
	return out
}

// With serve_compression = zstd, the first download of an xz (or
// uncompressed) NAR is served as the upstream has it and recoded on the
// way; from then on the narinfo names the zstd blob, with its FileHash and
// FileSize and the same signatures, and a client holding the older narinfo
// still gets the upstream's file.
func TestServeZstd(t *testing.T) {
	for _, c := range []narinfo.Compression{narinfo.CompressionXZ, narinfo.CompressionNone} {
		t.Run(string(c), func(t *testing.T) {
			f := recodeFixture(t)
			app := compressedObj(t, "app-1.0", c)
			f.up.publish(app)
			f.attest(app)

			before := parseNarInfo(t, f.narinfo(app))
			upFile := narFileOf(app)
			if before.Compression != c || before.URL != "nar/"+upFile || before.FileHash != app.ni.FileHash {
				t.Fatalf("before the first download the narinfo names %s (%s), want the upstream's file %s", before.URL, before.Compression, upFile)
			}
			got, body, err := f.fetch(upFile)
			if err != nil || body.Stream == nil || !bytes.Equal(got, app.file) {
				t.Fatalf("first download: %d bytes, %v; want the upstream's %d bytes streamed", len(got), err, len(app.file))
			}

			after := parseNarInfo(t, f.narinfo(app))
			zfile := app.hash + "-" + app.ni.NarHash.Nix32() + ".nar.zst"
			if after.Compression != narinfo.CompressionZstd || after.URL != "nar/"+zfile {
				t.Fatalf("after the first download the narinfo names %s (%s), want %s (zstd)", after.URL, after.Compression, zfile)
			}
			if after.NarHash != app.ni.NarHash || after.NarSize != app.ni.NarSize || !equalStrings(after.Sigs, before.Sigs) {
				t.Fatal("the recoded narinfo changed the NAR or the signatures")
			}
			fp, err := after.Fingerprint(storeDir)
			if err != nil {
				t.Fatal(err)
			}
			if len(verify.VerifyAny([]verify.PublicKey{f.g.PublicKey()}, fp, after.Sigs)) != 1 {
				t.Fatal("the gatekeeper signature does not verify over the recoded narinfo")
			}

			reqs := f.up.requests()
			zst, body, err := f.fetch(zfile)
			if err != nil || body.Blob == nil {
				t.Fatalf("zstd file: %v, from blob %v", err, body.Blob != nil)
			}
			if narinfo.SumSHA256(zst) != after.FileHash || uint64(len(zst)) != after.FileSize {
				t.Fatalf("served %d bytes hashing to %s; narinfo says %d, %s", len(zst), narinfo.SumSHA256(zst), after.FileSize, after.FileHash)
			}
			if !bytes.Equal(unzstd(t, zst), app.nar) {
				t.Fatal("the zstd file does not decode to the NAR")
			}
			if f.up.requests() != reqs {
				t.Fatal("the zstd file was fetched again")
			}

			// The older narinfo's file: the upstream's bytes, verified.
			got, _, err = f.fetch(upFile)
			if err != nil || !bytes.Equal(got, app.file) {
				t.Fatalf("upstream's file after the recode: %d bytes, %v", len(got), err)
			}

			// A decision made again names the zstd blob at once.
			if _, err := f.db.Forget(app.hash); err != nil {
				t.Fatal(err)
			}
			if again := parseNarInfo(t, f.narinfo(app)); again.URL != after.URL || again.FileHash != after.FileHash {
				t.Fatalf("decided again, the narinfo names %s", again.URL)
			}
		})
	}
}

func equalStrings(a, b []string) bool { return slices.Equal(a, b) }

// A client asking for the zstd file before it exists gets it recoded as
// the upstream's file streams in.
func TestServeZstdStreamsRecoded(t *testing.T) {
	f := recodeFixture(t)
	app := compressedObj(t, "app-1.0", narinfo.CompressionXZ)
	f.up.publish(app)
	f.attest(app)
	zfile := app.hash + "-" + app.ni.NarHash.Nix32() + ".nar.zst"
	zst, body, err := f.fetch(zfile)
	if err != nil || body.Stream == nil || body.Size != -1 {
		t.Fatalf("zstd file before it exists: %v, streamed %v, size %d", err, body.Stream != nil, body.Size)
	}
	if !bytes.Equal(unzstd(t, zst), app.nar) {
		t.Fatal("the streamed zstd file does not decode to the NAR")
	}
	if ni := parseNarInfo(t, f.narinfo(app)); ni.FileHash != narinfo.SumSHA256(zst) {
		t.Fatal("the narinfo does not describe the zstd file the client got")
	}
}

// An upstream serving other bytes than its narinfo says is caught while
// recoding, as without: the path is quarantined, the client never gets a
// complete file, and nothing is cached, recoded or not.
func TestServeZstdTamperedQuarantines(t *testing.T) {
	for _, file := range []string{"upstream", "zstd"} {
		t.Run(file, func(t *testing.T) {
			f := recodeFixture(t)
			app := compressedObj(t, "app-1.0", narinfo.CompressionXZ)
			evil := compressedObj(t, "app-1.0", narinfo.CompressionXZ)
			evil.nar[1000] ^= 1
			cmd := exec.Command("xz", "-c")
			cmd.Stdin = bytes.NewReader(evil.nar)
			bad, err := cmd.Output()
			if err != nil {
				t.Fatal(err)
			}
			// No FileHash: only the NAR hash can tell.
			app.ni.FileHash, app.ni.FileSize = narinfo.SHA256{}, 0
			app.file = bad
			f.up.publish(app)
			f.attest(app)
			name := narFileOf(app)
			zfile := app.hash + "-" + app.ni.NarHash.Nix32() + ".nar.zst"
			if file == "zstd" {
				name = zfile
			}
			got, _, err := f.fetch(name)
			var ve *verify.Error
			if !errors.As(err, &ve) || ve.Check != verify.CheckNarHash {
				t.Fatalf("client got %d bytes and %v, want a nar_hash failure", len(got), err)
			}
			if f.blobs.Has(zfile) || f.blobs.Has(narFileOf(app)) {
				t.Fatal("a NAR that failed verification was cached")
			}
			if q, err := f.db.Quarantine(app.hash); err != nil || q == nil {
				t.Fatalf("not quarantined: %v", err)
			}
			wantAnswer(t, "narinfo", f.narinfo(app), Reject, "rejected; reason=nar_mismatch")
			wantAnswer(t, "zstd file", f.nar(zfile), Reject, "rejected; reason=nar_mismatch")
		})
	}
}

// NARs cached before serve_compression was set are recoded from the cache
// when next served, without asking the upstream.
func TestServeZstdRecodesCachedBlobs(t *testing.T) {
	f := newFixture(t, false)
	app := compressedObj(t, "app-1.0", narinfo.CompressionXZ)
	f.up.publish(app)
	f.attest(app)
	if got, _, err := f.fetch(narFileOf(app)); err != nil || !bytes.Equal(got, app.file) {
		t.Fatalf("fetch before the switch: %v", err)
	}
	f.g.Close()
	g, err := New(Options{Policy: f.g.conf().policy, Upstreams: f.g.conf().upstreams, Key: f.g.key, DB: f.db, Blobs: f.blobs,
		Metrics: metrics.New(), Log: f.g.log, ServeCompression: narinfo.CompressionZstd})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	f.g = g
	reqs := f.up.requests()
	if ni := parseNarInfo(t, f.narinfo(app)); ni.Compression != narinfo.CompressionXZ {
		t.Fatalf("before anything was recoded the narinfo says %s", ni.Compression)
	}
	got, body, err := f.fetch(narFileOf(app))
	if err != nil || body.Blob == nil || !bytes.Equal(got, app.file) {
		t.Fatalf("cached xz file after the switch: %v, from blob %v", err, body.Blob != nil)
	}
	// The recode runs in the background; wait for the narinfo to change.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ni := parseNarInfo(t, f.narinfo(app))
		if ni.Compression == narinfo.CompressionZstd {
			zst, body, err := f.fetch(path.Base(ni.URL))
			if err != nil || body.Blob == nil || narinfo.SumSHA256(zst) != ni.FileHash || !bytes.Equal(unzstd(t, zst), app.nar) {
				t.Fatalf("recoded file: %v, from blob %v", err, body.Blob != nil)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the cached NAR was not recoded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := f.up.requests() - reqs; n != 0 { // decided again from the stored narinfo
		t.Fatalf("%d upstream requests after the switch, want 0", n)
	}
}

// A pooled encoder, reused, writes a complete zstd stream each time.
func TestEncoderPoolReuse(t *testing.T) {
	encs := &encoders{}
	for i := range 3 {
		data := bytes.Repeat([]byte{byte(i), 'x', 'y'}, 100<<10)
		var out bytes.Buffer
		enc := encs.get(&out)
		if _, err := enc.Write(data); err != nil {
			t.Fatal(err)
		}
		if err := enc.Close(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(unzstd(t, out.Bytes()), data) {
			t.Fatalf("round %d: the stream does not decode to its input", i)
		}
	}
}
