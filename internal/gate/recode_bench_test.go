package gate

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
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// BenchmarkRecode measures what serve_compression = "zstd" costs on a
// first download: verifying a 32 MiB xz NAR (xz -6, as Nix publishes) and
// recoding it to zstd on the way, against plain verification of the same
// file in the same run. recode_vs_verify is the ratio of CPU time (user +
// system, which a loaded machine does not distort as it does wall time);
// 1.0 would be free. It also measures the client side, once:
// `zstd -dc | sha256sum` of the recoded file against `xz -dc | sha256sum`
// of the upstream's, in CPU time (xz_vs_zstd_decode+hash: how many times
// less a client spends decoding and hashing what it gets; _decode: decoding
// alone).
//
//	go test -run X -bench Recode -benchtime 3x ./internal/gate/
func BenchmarkRecode(b *testing.B) {
	nar, xzFile := recodeBenchFiles(b)
	sum := sha256.Sum256(nar)
	xsum := sha256.Sum256(xzFile)
	e := verify.Expect{Compression: narinfo.CompressionXZ, FileHash: narinfo.SHA256(xsum), FileSize: uint64(len(xzFile)),
		NarHash: narinfo.SHA256(sum), NarSize: uint64(len(nar))}
	encs := &encoders{}
	var plain, recode time.Duration
	var out bytes.Buffer
	b.SetBytes(int64(len(nar)))
	for b.Loop() {
		start := cpuTime()
		if err := verifyFile(e, xzFile, nil); err != nil {
			b.Fatal(err)
		}
		plain += cpuTime() - start

		out.Reset()
		start = cpuTime()
		enc := encs.get(&out)
		if err := verifyFile(e, xzFile, enc); err != nil {
			b.Fatal(err)
		}
		if err := enc.Close(); err != nil {
			b.Fatal(err)
		}
		recode += cpuTime() - start
	}
	n := float64(b.N)
	b.ReportMetric(float64(len(nar))/(plain.Seconds()/n)/1e6, "verify-MB/cpu-s")
	b.ReportMetric(float64(len(nar))/(recode.Seconds()/n)/1e6, "recode-MB/cpu-s")
	b.ReportMetric(recode.Seconds()/plain.Seconds(), "recode_vs_verify")
	b.ReportMetric(float64(out.Len())/float64(len(xzFile)), "zst_vs_xz_size")

	// The client side, once: decode and hash each file as Nix would.
	b.StopTimer()
	dir := b.TempDir()
	zf, xf := filepath.Join(dir, "nar.zst"), filepath.Join(dir, "nar.xz")
	if err := os.WriteFile(zf, out.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(xf, xzFile, 0o644); err != nil {
		b.Fatal(err)
	}
	tz, errZ := cliCPU(`zstd -dc "$1" | sha256sum`, zf, sum)
	tx, errX := cliCPU(`xz -dc "$1" | sha256sum`, xf, sum)
	if errZ == nil && errX == nil {
		b.ReportMetric(tx.Seconds()/tz.Seconds(), "xz_vs_zstd_decode+hash")
	}
	tz, errZ = cliCPU(`zstd -dc "$1" >/dev/null; sha256sum </dev/null`, zf, zeroSum)
	tx, errX = cliCPU(`xz -dc "$1" >/dev/null; sha256sum </dev/null`, xf, zeroSum)
	if errZ == nil && errX == nil {
		b.ReportMetric(tx.Seconds()/tz.Seconds(), "xz_vs_zstd_decode")
	}
}

// zeroSum is the SHA-256 of nothing.
var zeroSum = sha256.Sum256(nil)

// verifyFile runs data through a Verifier in 256 KiB writes (narstream's
// read size), copying the NAR to out when it is not nil.
func verifyFile(e verify.Expect, data []byte, out io.Writer) error {
	v, err := verify.NewVerifier(e)
	if err != nil {
		return err
	}
	if out != nil {
		v.SetNAROutput(out)
	}
	for p := data; len(p) > 0; {
		n := min(256<<10, len(p))
		if _, err := v.Write(p[:n]); err != nil {
			v.Abort()
			return err
		}
		p = p[n:]
	}
	return v.Finish()
}

// cliCPU runs a shell pipeline over file and returns the CPU time of the
// shell and the processes it waited for.
func cliCPU(script, file string, want [32]byte) (time.Duration, error) {
	cmd := exec.Command("sh", "-c", script, "sh", file)
	got, err := cmd.Output()
	if err != nil {
		return 0, err
	}
	if !strings.HasPrefix(string(got), fmt.Sprintf("%x", want)) {
		return 0, fmt.Errorf("%s: wrong hash", script)
	}
	return cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(), nil
}

// recodeBenchFiles returns a 32 MiB NAR-like payload (text and binary
// files with the compressibility of typical store paths) and its xz -6
// file, cached in the temp dir between runs (xz -6 takes a while).
func recodeBenchFiles(b *testing.B) (nar, xzFile []byte) {
	if _, err := exec.LookPath("xz"); err != nil {
		b.Skip("xz not installed")
	}
	dir := filepath.Join(os.TempDir(), "cacheproxy-recode-bench-v1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	np, xp := filepath.Join(dir, "payload.nar"), filepath.Join(dir, "payload.nar.xz")
	nar, err1 := os.ReadFile(np)
	xzFile, err2 := os.ReadFile(xp)
	if err1 == nil && err2 == nil {
		return nar, xzFile
	}
	nar = makePayload(32 << 20)
	cmd := exec.Command("xz", "-6", "-c")
	cmd.Stdin = bytes.NewReader(nar)
	xzFile, err := cmd.Output()
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(np, nar, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(xp, xzFile, 0o644); err != nil {
		b.Fatal(err)
	}
	return nar, xzFile
}

func makePayload(size int) []byte {
	rng := rand.New(rand.NewPCG(3, 4))
	words := strings.Fields(`the of and to in is for on with as by that this from be are
		int char return if else while struct static const void include define
		function value error nil err func package import string byte len make
		/nix/store lib bin share usr local configure install build test check`)
	var buf bytes.Buffer
	for buf.Len() < size {
		if rng.IntN(2) == 0 { // text
			for k := 4 << 10; k > 0; k-- {
				buf.WriteString(words[rng.IntN(len(words))])
				buf.WriteByte(" \n\t"[rng.IntN(3)])
			}
			continue
		}
		for k := 8 << 10; k > 0; k-- { // binary: zero runs, patterns, noise
			switch rng.IntN(4) {
			case 0:
				buf.Write(make([]byte, rng.IntN(64)))
			case 1:
				buf.Write([]byte{0x48, 0x89, 0xe5, 0x41, 0x57, 0x41, 0x56, byte(rng.IntN(256))})
			default:
				buf.WriteByte(byte(rng.Uint32()))
			}
		}
	}
	return buf.Bytes()[:size]
}
