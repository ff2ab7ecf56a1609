package verify

import (
	"bytes"
	"crypto/sha256"
	"io"
	"os"
	"testing"

	rcxz "github.com/therootcompany/xz"
	"github.com/ulikunitz/xz"
)

// Temporary: compare the two pure-Go xz decoders.
func BenchmarkXZAlt(b *testing.B) {
	bf := loadBench(b)
	data, err := os.ReadFile(bf.path["xz"])
	if err != nil {
		b.Fatal(err)
	}
	b.Run("ulikunitz", func(b *testing.B) {
		b.SetBytes(int64(len(bf.nar)))
		for b.Loop() {
			r, err := xz.NewReader(bytes.NewReader(data))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(sha256.New(), r); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("therootcompany", func(b *testing.B) {
		b.SetBytes(int64(len(bf.nar)))
		for b.Loop() {
			r, err := rcxz.NewReader(bytes.NewReader(data), 0)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(sha256.New(), r); err != nil {
				b.Fatal(err)
			}
		}
	})
}
