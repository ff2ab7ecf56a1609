// Package attestgen writes large, realistic attestation inputs for tests
// and benchmarks: `nix path-info --json --sigs` output (the array shape of
// Nix <= 2.18) for n made-up store paths, each signed by a rebuilder key
// over its real fingerprint, so an import verifies and stores every one.
// The output is the same for the same arguments.
package attestgen

import (
	"bufio"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Key is a rebuilder key made from a fixed seed, so that generated inputs
// can be kept between runs.
func Key(name string) verify.SecretKey {
	seed := sha256.Sum256([]byte("attestgen/" + name))
	return verify.SecretKey{Name: name, Key: ed25519.NewKeyFromSeed(seed[:])}
}

// Hash is the store path hash of generated path i.
func Hash(i int) string {
	d := sha256.Sum256(binary.BigEndian.AppendUint64([]byte("attestgen/path"), uint64(i)))
	return nixbase32.EncodeToString(d[:20])
}

// Base is the base name of generated path i.
func Base(i int) string { return fmt.Sprintf("%s-pkg-%d-1.0", Hash(i), i) }

// Path is generated path i as a store path the upstream can serve with the
// same fingerprint: NarHash, NarSize and References.
type Path struct {
	StorePath  string
	NarHash    narinfo.SHA256
	NarSize    uint64
	References []string // base names, sorted
	Deriver    string
}

// Make returns generated path i with refs references (to paths before it).
func Make(storeDir string, i, refs int) Path {
	p := Path{StorePath: storeDir + "/" + Base(i), NarSize: uint64(1000 + i%100000*37),
		Deriver: Hash(i+1<<40) + "-pkg-" + fmt.Sprint(i) + "-1.0.drv"}
	p.NarHash = narinfo.SumSHA256(binary.BigEndian.AppendUint64([]byte("attestgen/nar"), uint64(i)))
	seen := map[int]bool{}
	for r := 1; r <= refs && r <= i; r++ {
		j := (i*7919 + r*104729) % i // earlier paths, spread out
		if !seen[j] {
			seen[j] = true
			p.References = append(p.References, Base(j))
		}
	}
	sortStrings(p.References)
	return p
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// entry is one element of the array shape.
type entry struct {
	Path             string   `json:"path"`
	NarHash          string   `json:"narHash"`
	NarSize          uint64   `json:"narSize"`
	References       []string `json:"references"`
	Deriver          string   `json:"deriver"`
	RegistrationTime int64    `json:"registrationTime"`
	Signatures       []string `json:"signatures"`
	Valid            bool     `json:"valid"`
}

// Write writes the path-info JSON of paths 0..n-1, each with refs
// references and signed by key, signing on every core.
func Write(w io.Writer, key verify.SecretKey, storeDir string, n, refs int) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	if _, err := bw.WriteString("["); err != nil {
		return err
	}
	const chunk = 2000
	workers := runtime.GOMAXPROCS(0)
	type part struct {
		buf []byte
		err error
	}
	for start := 0; start < n; start += chunk * workers {
		parts := make([]part, workers)
		var wg sync.WaitGroup
		for k := range workers {
			lo := start + k*chunk
			hi := min(lo+chunk, n)
			wg.Add(1)
			go func() {
				defer wg.Done()
				var buf []byte
				for i := lo; i < hi; i++ {
					p := Make(storeDir, i, refs)
					fp, err := narinfo.Fingerprint(storeDir, p.StorePath, p.NarHash, p.NarSize, p.References)
					if err != nil {
						parts[k].err = err
						return
					}
					e := entry{Path: p.StorePath, NarHash: "sha256-" + base64.StdEncoding.EncodeToString(p.NarHash[:]),
						NarSize: p.NarSize, References: p.References, Deriver: storeDir + "/" + p.Deriver,
						RegistrationTime: 1700000000 + int64(i), Signatures: []string{key.Sign(fp)}, Valid: true}
					if e.References == nil {
						e.References = []string{}
					}
					for j, r := range e.References {
						e.References[j] = storeDir + "/" + r
					}
					raw, err := json.Marshal(e)
					if err != nil {
						parts[k].err = err
						return
					}
					if i > 0 {
						buf = append(buf, ",\n"...)
					}
					buf = append(buf, raw...)
				}
				parts[k].buf = buf
			}()
		}
		wg.Wait()
		for _, p := range parts {
			if p.err != nil {
				return p.err
			}
			if _, err := bw.Write(p.buf); err != nil {
				return err
			}
		}
	}
	if _, err := bw.WriteString("]\n"); err != nil {
		return err
	}
	return bw.Flush()
}
