//go:build liblzma

package verify

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// benchXZCodecs are the xz decoders in this build, for BenchmarkXZDecoder.
var benchXZCodecs = []struct {
	name string
	c    codec
}{{"go", goXZCodec}, {"liblzma", xzCodec}}

// fuzzXZReader is FuzzVerifier's reference xz decoder: the library the
// build decodes with. liblzma refuses a few malformed streams the Go
// decoder reads (see TestLZMAMatchesGoDecoder), so the Go decoder cannot
// be the reference for what this build must accept.
func fuzzXZReader(src io.Reader) (io.Reader, func(), error) {
	return openLZMA(src, 0)
}

// runWith is run with the verifier's xz decoder swapped for c. Tests using
// it must not run in parallel: xzCodec is package state, fixed in
// production.
func runWith(t *testing.T, c codec, e Expect, data []byte, chunk int) error {
	t.Helper()
	saved := xzCodec
	xzCodec = c
	defer func() { xzCodec = saved }()
	return run(t, e, data, chunk)
}

// xzVariants are the streams the two decoders must agree on: truncations,
// flipped bits, padding (good and bad), concatenation, garbage after the
// stream and no stream at all. Every byte of the headers, index and footer
// (the first and last 64; 32 under -race) is cut at and flipped two ways;
// in the LZMA data between them every 5th byte (every 31st under -race),
// so that the test stays quick.
func xzVariants(data []byte) map[string][]byte {
	vs := map[string][]byte{
		"good":            data,
		"empty":           {},
		"padding4":        append(slices.Clone(data), 0, 0, 0, 0),
		"padding3":        append(slices.Clone(data), 0, 0, 0),
		"padding8":        append(slices.Clone(data), make([]byte, 8)...),
		"concatenated":    append(slices.Clone(data), data...),
		"garbage":         append(slices.Clone(data), 'x'),
		"garbage-after-4": append(slices.Clone(data), 0, 0, 0, 0, 1, 2, 3, 4),
		"header-only":     slices.Clone(data[:12]),
	}
	edges, stride := 64, 5
	if raceEnabled {
		edges, stride = 32, 31
	}
	for pos := range data {
		edge := pos < edges || pos >= len(data)-edges
		if !edge && pos%stride != 0 {
			continue
		}
		vs[fmt.Sprintf("cut-%d", pos)] = slices.Clone(data[:pos])
		for _, x := range []byte{0x01, 0x80} {
			if !edge && x == 0x01 {
				continue
			}
			bad := slices.Clone(data)
			bad[pos] ^= x
			vs[fmt.Sprintf("flip-%d-%02x", pos, x)] = bad
		}
	}
	return vs
}

// liblzma and the Go decoder accept and refuse the same streams, with one
// exception: liblzma is stricter about a few malformed fields the Go
// decoder skips over (the range coder's first byte, which must be 0, for
// one), and refuses those streams as xz(1) does, where the Go decoder
// decodes the same NAR. Both refuse for the same reason (the Check), except
// that one decoder can notice corruption, or a cut in the index after the
// last block, only after the whole NAR has come out: then it is
// CheckNarSize for one and CheckDecompress for the other (the Check is
// only a metric label). Which decoder a proxy was built with never changes
// which NAR it serves: an accepted stream always decodes to the signed one.
func TestLZMAMatchesGoDecoder(t *testing.T) {
	type input struct {
		name string
		e    Expect
		data []byte
	}
	var inputs []input
	for _, h := range []string{treeHash, flatHash} {
		f := loadFixture(t, "xz", h)
		inputs = append(inputs, input{f.name, f.expect, f.data})
	}
	tree := loadFixture(t, "xz", treeHash)
	if _, err := exec.LookPath("xz"); err == nil {
		// Other container settings: no check, SHA-256, several blocks, a
		// BCJ filter in front of LZMA2.
		for _, args := range [][]string{{"-C", "none"}, {"-C", "sha256"}, {"--block-size=1000"}, {"--x86", "--lzma2=preset=6"}} {
			cmd := exec.Command("xz", append([]string{"-c"}, args...)...)
			cmd.Stdin = bytes.NewReader(tree.nar)
			out, err := cmd.Output()
			if err != nil {
				t.Fatal(err)
			}
			inputs = append(inputs, input{fmt.Sprint("xz ", args), tree.expect, out})
		}
	}
	compared, refused, stricter, later := 0, 0, 0, 0
	for _, in := range inputs {
		for name, data := range xzVariants(in.data) {
			// The narinfo "fixed up" to match the bytes, as a malicious
			// upstream would: the decoders themselves must tell.
			e := in.e
			e.FileHash, e.FileSize = narinfo.SumSHA256(data), uint64(len(data))
			goErr := runWith(t, goXZCodec, e, data, 4096)
			lzErr := runWith(t, xzCodec, e, data, 4096)
			compared++
			if lzErr != nil {
				refused++
			}
			if checkOf(goErr) == checkOf(lzErr) {
				continue
			}
			what := fmt.Sprintf("%s %s (%d bytes): Go decoder: %v; liblzma: %v", in.name, name, len(data), goErr, lzErr)
			switch {
			case goErr == nil && checkOf(lzErr) == CheckDecompress && !xzTestAccepts(t, data):
				stricter++
			case goErr != nil && lzErr != nil &&
				slices.Contains([]Check{CheckDecompress, CheckNarSize}, checkOf(goErr)) &&
				slices.Contains([]Check{CheckDecompress, CheckNarSize}, checkOf(lzErr)):
				later++
			default:
				t.Errorf("%s", what)
			}
		}
	}
	t.Logf("%d streams compared, %d refused by liblzma; %d refused only by liblzma (as by xz -t), %d refused for NarSize by one and as corrupt by the other",
		compared, refused, stricter, later)
}

// xzTestAccepts runs `xz -t` over data.
func xzTestAccepts(t *testing.T, data []byte) bool {
	t.Helper()
	cmd := exec.Command("xz", "-t")
	cmd.Stdin = bytes.NewReader(data)
	return cmd.Run() == nil
}

// liblzma's state, dictionary included, lives in C memory the collector
// does not see: every decoder is freed when its stream is done, whatever
// the outcome.
func TestLZMAStateFreed(t *testing.T) {
	f := loadFixture(t, "xz", treeHash)
	bad := slices.Clone(f.data)
	bad[len(bad)/2] ^= 0x80
	errs := make(chan error, 4)
	for i := range 4 { // several at once
		go func() {
			v, err := NewVerifier(f.expect)
			if err == nil {
				switch i {
				case 0:
					_, err = v.Write(f.data)
					if err == nil {
						err = v.Finish()
					}
				case 1: // corrupt
					v.Write(bad)
					if v.Finish() == nil {
						err = errors.New("corrupt stream accepted")
					}
				case 2: // cut short
					v.Write(f.data[:len(f.data)/2])
					if v.Finish() == nil {
						err = errors.New("truncated stream accepted")
					}
				case 3: // aborted half way
					v.Write(f.data[:len(f.data)/2])
					v.Abort()
				}
			}
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := lzmaStates.Load(); n != 0 {
		t.Fatalf("%d liblzma decoders not freed", n)
	}
}
