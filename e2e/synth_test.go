package e2e

// Store objects made in Go, for tests that need many distinct paths (kill
// loops, disk-full, soak) where building each with nix-build would take
// seconds apiece. Each object is one regular file of random bytes as an
// uncompressed NAR, with a narinfo signed by the upstream's key; its store
// path hash is random, which Nix accepts for an input-addressed path.

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// synthObj is a store object published on an upstream by publishSynth.
type synthObj struct {
	Path StorePath
	NI   *Narinfo // as the upstream serves it
	NAR  []byte   // the uncompressed NAR (also the upstream's file)
}

// narString appends a NAR string: length, bytes, zero padding to 8.
func narString(b *bytes.Buffer, s []byte) {
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(s)))
	b.Write(n[:])
	b.Write(s)
	b.Write(make([]byte, (8-len(s)%8)%8))
}

// singleFileNAR is the NAR of a store path that is one regular file.
func singleFileNAR(content []byte) []byte {
	var b bytes.Buffer
	for _, s := range []string{"nix-archive-1", "(", "type", "regular", "contents"} {
		narString(&b, []byte(s))
	}
	narString(&b, content)
	narString(&b, []byte(")"))
	return b.Bytes()
}

// randomStorePath is /nix/store/<random hash>-<name>.
func randomStorePath(rng *rand.Rand, name string) StorePath {
	h := make([]byte, 20)
	for i := range h {
		h[i] = byte(rng.UintN(256))
	}
	return StorePath(fmt.Sprintf("%s/%s-%s", storeDir, nix32(h), name))
}

// synthesize makes an object of about size bytes of content from rng
// without publishing it.
func synthesize(rng *rand.Rand, key *Key, name string, size int) *synthObj {
	content := make([]byte, size)
	for i := 0; i+8 <= len(content); i += 8 {
		binary.LittleEndian.PutUint64(content[i:], rng.Uint64())
	}
	nar := singleFileNAR(content)
	sp := randomStorePath(rng, name)
	narHash := sha256Nix32(nar)
	fileHash := sha256.Sum256(nar)
	ni := &Narinfo{}
	ni.Add("StorePath", string(sp))
	ni.Add("URL", "nar/"+nix32(fileHash[:])+".nar")
	ni.Add("Compression", "none")
	ni.Add("FileHash", narHash)
	ni.Add("FileSize", strconv.Itoa(len(nar)))
	ni.Add("NarHash", narHash)
	ni.Add("NarSize", strconv.Itoa(len(nar)))
	ni.Add("References", "")
	ni.Add("Sig", key.Sign(ni.Fingerprint()))
	return &synthObj{Path: sp, NI: ni, NAR: nar}
}

// publishSynth makes an object with synthesize and writes its narinfo and
// NAR into the upstream's directory.
func (u *Upstream) publishSynth(t testing.TB, rng *rand.Rand, name string, size int) *synthObj {
	t.Helper()
	o := synthesize(rng, u.Key, name, size)
	if err := os.MkdirAll(filepath.Join(u.Dir, "nar"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(u.Dir, o.NI.Get("URL")), o.NAR, 0o644); err != nil {
		t.Fatal(err)
	}
	u.PutNarinfo(t, o.Path, o.NI)
	return o
}

// synthNarinfos lists the narinfos of objs (for craftAttestation).
func synthNarinfos(objs ...*synthObj) []*Narinfo {
	nis := make([]*Narinfo, len(objs))
	for i, o := range objs {
		nis[i] = o.NI
	}
	return nis
}

// fetchSynth does what Nix does for o: the narinfo, then the NAR it names.
// It returns "nar: complete" only for a 200 whose bytes are o's NAR and hash
// to the NarHash of the narinfo served with them; a complete 200 with any
// other bytes fails the test ("nar: WRONG"). Otherwise it says what
// happened: "narinfo: 404", "nar: 503", "nar: cut after N bytes".
func (p *Proxy) fetchSynth(t testing.TB, o *synthObj) string {
	resp, body, err := p.Get(t, "/"+o.Path.Hash()+".narinfo")
	if err != nil {
		return "narinfo: cut"
	}
	if resp.StatusCode != 200 {
		return fmt.Sprintf("narinfo: %d", resp.StatusCode)
	}
	ni, err := parseNarinfo(string(body))
	if err != nil {
		t.Errorf("%s: narinfo does not parse: %v\n%s", o.Path.Name(), err, body)
		return "narinfo: bad"
	}
	resp, body, err = p.Get(t, narPath(ni))
	switch {
	case err != nil:
		return fmt.Sprintf("nar: cut after %d bytes", len(body))
	case resp.StatusCode != 200:
		return fmt.Sprintf("nar: %d", resp.StatusCode)
	}
	if got, want := sha256Nix32(body), ni.Get("NarHash"); got != want || !bytes.Equal(body, o.NAR) {
		t.Errorf("%s: a complete 200 NAR of %d bytes hashes to %s; its narinfo says %s (the real NAR: %d bytes)", o.Path.Name(), len(body), got, want, len(o.NAR))
		return "nar: WRONG"
	}
	return "nar: complete"
}
