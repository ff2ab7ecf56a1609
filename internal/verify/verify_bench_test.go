package verify

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/nix-community/go-nix/pkg/nar"
)

// The benchmarks run over a ~64 MiB NAR-like payload (a directory of text
// and binary files with the compressibility of typical store paths), built
// once and compressed with the reference CLI tools. The files are cached in
// the system temp dir between runs because xz -6 over 64 MiB takes a while.

const benchNarTarget = 64 << 20

type benchFiles struct {
	dir  string
	nar  []byte
	exps map[string]Expect
	path map[string]string // compression -> file
}

var (
	benchOnce sync.Once
	benchData *benchFiles
	benchErr  error
)

// Compression settings: what Nix uses by default where it has one (xz -6,
// zstd -3), bzip2's default, and brotli at a level a cache would use for
// 64 MiB objects (q 11 would take minutes).
var benchTools = []struct {
	name, ext string
	cmd       []string
}{
	{"xz", "xz", []string{"xz", "-6", "-c"}},
	{"zstd", "zst", []string{"zstd", "-3", "-c", "-q"}},
	{"bzip2", "bz2", []string{"bzip2", "-9", "-c"}},
	{"br", "br", []string{"brotli", "-q", "5", "-c"}},
}

func loadBench(b *testing.B) *benchFiles {
	b.Helper()
	benchOnce.Do(func() { benchData, benchErr = buildBench() })
	if benchErr != nil {
		b.Skip(benchErr)
	}
	return benchData
}

func buildBench() (*benchFiles, error) {
	dir := filepath.Join(os.TempDir(), "cacheproxy-verify-bench-v1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	narPath := filepath.Join(dir, "payload.nar")
	data, err := os.ReadFile(narPath)
	if err != nil {
		data = makeBenchNAR()
		if err := os.WriteFile(narPath, data, 0o644); err != nil {
			return nil, err
		}
	}
	d := sha256.Sum256(data)
	bf := &benchFiles{dir: dir, nar: data, exps: map[string]Expect{}, path: map[string]string{}}
	narHash := narinfo.SHA256(d)
	bf.exps["none"] = Expect{Compression: "none", FileHash: narHash, FileSize: uint64(len(data)), NarHash: narHash, NarSize: uint64(len(data))}
	bf.path["none"] = narPath
	for _, tool := range benchTools {
		out := narPath + "." + tool.ext
		if _, err := os.Stat(out); err != nil {
			if _, err := exec.LookPath(tool.cmd[0]); err != nil {
				continue
			}
			cmd := exec.Command(tool.cmd[0], tool.cmd[1:]...)
			cmd.Stdin = bytes.NewReader(data)
			comp, err := cmd.Output()
			if err != nil {
				return nil, fmt.Errorf("%s: %w", tool.cmd[0], err)
			}
			if err := os.WriteFile(out, comp, 0o644); err != nil {
				return nil, err
			}
		}
		comp, err := os.ReadFile(out)
		if err != nil {
			return nil, err
		}
		fd := sha256.Sum256(comp)
		bf.exps[tool.name] = Expect{Compression: narinfo.Compression(tool.name), FileHash: narinfo.SHA256(fd), FileSize: uint64(len(comp)), NarHash: narHash, NarSize: uint64(len(data))}
		bf.path[tool.name] = out
	}
	return bf, nil
}

// makeBenchNAR builds a deterministic NAR of about benchNarTarget bytes:
// half "source/text" files from a word list, half "binary" files mixing zero
// runs, repeated instruction-like patterns and noise.
func makeBenchNAR() []byte {
	rng := rand.New(rand.NewPCG(1, 2))
	words := strings.Fields(`the of and to in is for on with as by that this from be are
		int char return if else while struct static const void include define
		function value error nil err func package import string byte len make
		/nix/store lib bin share usr local configure install build test check`)
	var buf bytes.Buffer
	nw, err := nar.NewWriter(&buf)
	if err != nil {
		panic(err)
	}
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	must(nw.WriteHeader(&nar.Header{Path: "/", Type: nar.TypeDirectory}))
	const fileSize = 256 << 10
	for i := 0; buf.Len() < benchNarTarget-fileSize; i++ {
		var content []byte
		if i%2 == 0 {
			var sb strings.Builder
			for sb.Len() < fileSize {
				n := 3 + rng.IntN(10)
				for j := 0; j < n; j++ {
					sb.WriteString(words[rng.IntN(len(words))])
					sb.WriteByte(' ')
				}
				if rng.IntN(5) == 0 {
					fmt.Fprintf(&sb, "%d", rng.IntN(100000))
				}
				sb.WriteByte('\n')
			}
			content = []byte(sb.String()[:fileSize])
		} else {
			content = make([]byte, 0, fileSize)
			pats := make([][]byte, 64)
			for k := range pats {
				pats[k] = make([]byte, 4+rng.IntN(12))
				for m := range pats[k] {
					pats[k][m] = byte(rng.Uint32())
				}
			}
			for len(content) < fileSize {
				switch rng.IntN(4) {
				case 0:
					content = append(content, make([]byte, rng.IntN(64))...)
				case 1, 2:
					content = append(content, pats[rng.IntN(len(pats))]...)
				default:
					for k := rng.IntN(32); k > 0; k-- {
						content = append(content, byte(rng.Uint32()))
					}
				}
			}
			content = content[:fileSize]
		}
		must(nw.WriteHeader(&nar.Header{Path: fmt.Sprintf("/f%05d", i), Type: nar.TypeRegular, Size: int64(len(content)), Executable: i%7 == 0}))
		_, err := nw.Write(content)
		must(err)
	}
	must(nw.Close())
	return buf.Bytes()
}

// feedVerifier streams data through a Verifier in 32 KiB writes, the size
// net/http hands out.
func feedVerifier(b *testing.B, e Expect, data []byte) {
	v, err := NewVerifier(e)
	if err != nil {
		b.Fatal(err)
	}
	for p := data; len(p) > 0; {
		n := min(32<<10, len(p))
		if _, err := v.Write(p[:n]); err != nil {
			b.Fatal(err)
		}
		p = p[n:]
	}
	if err := v.Finish(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkVerify reports throughput in decompressed (NAR) bytes per second;
// "comp-MB/s" is the compressed input rate.
func BenchmarkVerify(b *testing.B) {
	bf := loadBench(b)
	for _, c := range []string{"none", "xz", "zstd", "bzip2", "br"} {
		e, ok := bf.exps[c]
		if !ok {
			continue
		}
		data, err := os.ReadFile(bf.path[c])
		if err != nil {
			b.Fatal(err)
		}
		b.Run(c, func(b *testing.B) {
			b.SetBytes(int64(e.NarSize))
			b.ReportAllocs()
			for b.Loop() {
				feedVerifier(b, e, data)
			}
			sec := b.Elapsed().Seconds() / float64(b.N)
			b.ReportMetric(float64(len(data))/sec/1e6, "comp-MB/s")
			b.ReportMetric(float64(e.NarSize)/float64(len(data)), "ratio")
		})
	}
}

// BenchmarkXZReference compares the Verifier's xz path (the decoder this
// build uses, XZDecoder) with liblzma's CLI doing the same work (`xz -dc FILE | sha256sum`, i.e. decode and hash in
// two processes). x_vs_xz-dc is Verifier time / CLI time: 1.0 is parity,
// above is slower.
func BenchmarkXZReference(b *testing.B) {
	bf := loadBench(b)
	path, ok := bf.path["xz"]
	if !ok {
		b.Skip("xz not installed")
	}
	if _, err := exec.LookPath("sha256sum"); err != nil {
		b.Skip("sha256sum not installed")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	e := bf.exps["xz"]
	b.SetBytes(int64(e.NarSize))
	b.Logf("xz decoder: %s", XZDecoder)
	want := fmt.Sprintf("%x", sha256.Sum256(bf.nar))
	var cli, ours time.Duration
	for b.Loop() {
		cli += xzCLITime(b, path, want)
		start := time.Now()
		feedVerifier(b, e, data)
		ours += time.Since(start)
	}
	n := float64(b.N)
	b.ReportMetric(float64(e.NarSize)/(cli.Seconds()/n)/1e6, "xz-dc-MB/s")
	b.ReportMetric(float64(e.NarSize)/(ours.Seconds()/n)/1e6, "verify-MB/s")
	b.ReportMetric(ours.Seconds()/cli.Seconds(), "x_vs_xz-dc")
}

// xzCLITime runs the reference, `xz -dc FILE | sha256sum`, once, checks
// that it hashed to want (hex) and returns how long it took.
func xzCLITime(b *testing.B, path, want string) time.Duration {
	start := time.Now()
	out, err := exec.Command("sh", "-c", `xz -dc "$1" | sha256sum`, "sh", path).Output()
	if err != nil {
		b.Fatal(err)
	}
	took := time.Since(start)
	if !strings.HasPrefix(string(out), want) {
		b.Fatalf("xz -dc | sha256sum = %q, want %s", out, want)
	}
	return took
}

// BenchmarkXZDecoder measures each xz decoder built in (the Go one, and
// liblzma's with -tags liblzma) bare, decode + sha256 of the output in one
// goroutine without the Verifier's plumbing, against `xz -dc FILE |
// sha256sum` over the same file in the same iterations. x_vs_xz-dc is
// decoder time / CLI time.
func BenchmarkXZDecoder(b *testing.B) {
	bf := loadBench(b)
	path, ok := bf.path["xz"]
	if !ok {
		b.Skip("xz not installed")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	want := fmt.Sprintf("%x", sha256.Sum256(bf.nar))
	for _, dec := range benchXZCodecs {
		b.Run(dec.name, func(b *testing.B) {
			b.SetBytes(int64(len(bf.nar)))
			var cli, ours time.Duration
			for b.Loop() {
				cli += xzCLITime(b, path, want)
				start := time.Now()
				r, closeFn, err := dec.c.open(bytes.NewReader(data), uint64(len(bf.nar)))
				if err != nil {
					b.Fatal(err)
				}
				h := sha256.New()
				if _, err := io.Copy(h, r); err != nil {
					b.Fatal(err)
				}
				closeFn()
				ours += time.Since(start)
				if got := fmt.Sprintf("%x", h.Sum(nil)); got != want {
					b.Fatalf("%s decoded to sha256 %s, want %s", dec.name, got, want)
				}
			}
			n := float64(b.N)
			b.ReportMetric(float64(len(bf.nar))/(cli.Seconds()/n)/1e6, "xz-dc-MB/s")
			b.ReportMetric(float64(len(bf.nar))/(ours.Seconds()/n)/1e6, "decode-MB/s")
			b.ReportMetric(ours.Seconds()/cli.Seconds(), "x_vs_xz-dc")
		})
	}
}
