package cache

import (
	"fmt"
	"io"
	"os"

	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// BlobFailure is a blob that no longer matches what it was verified against.
type BlobFailure struct {
	Blob      string `json:"blob"`
	StorePath string `json:"store_path,omitempty"`
	Error     string `json:"error"`
}

// VerifyAll re-hashes every blob against its index entry and removes the
// ones that fail (disk corruption, tampering on the host). It returns how
// many it checked and the failures.
func (b *Blobs) VerifyAll() (int, []BlobFailure, error) {
	var failed []BlobFailure
	names := b.Names()
	for _, name := range names {
		m, err := b.Meta(name)
		if err != nil {
			return 0, failed, err
		}
		if m == nil {
			continue // removed meanwhile
		}
		if err := checkBlob(b.Path(name), *m); err != nil {
			failed = append(failed, BlobFailure{Blob: name, StorePath: m.StorePath, Error: err.Error()})
			if err := b.Remove(name); err != nil {
				return len(names), failed, err
			}
		}
	}
	return len(names), failed, nil
}

// Check re-hashes one blob against its index entry and drops it if it
// fails. It returns the bytes read and the failure, if any; a blob removed
// meanwhile is no failure.
func (b *Blobs) Check(name string) (int64, *BlobFailure, error) {
	m, err := b.Meta(name)
	if err != nil || m == nil {
		return 0, nil, err
	}
	if err := checkBlob(b.Path(name), *m); err != nil {
		if !b.Has(name) {
			return m.Size, nil, nil // evicted while we read it
		}
		f := &BlobFailure{Blob: name, StorePath: m.StorePath, Error: err.Error()}
		return m.Size, f, b.Remove(name)
	}
	return m.Size, nil, nil
}

func checkBlob(path string, m BlobMeta) error {
	v, err := verify.NewVerifier(m.NAR)
	if err != nil {
		return err
	}
	defer v.Abort()
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(v, f); err != nil {
		return fmt.Errorf("re-hash: %w", err)
	}
	return v.Finish()
}
