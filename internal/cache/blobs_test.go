package cache

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
	bolt "go.etcd.io/bbolt"
)

func newBlobs(t *testing.T, maxSize int64) (*DB, string, *Blobs) {
	t.Helper()
	db, _ := openTestDB(t)
	state := t.TempDir()
	b, err := OpenBlobs(db, state, maxSize)
	must(t, err)
	return db, state, b
}

func commit(t *testing.T, b *Blobs, name string, data []byte, meta BlobMeta) {
	t.Helper()
	f, err := b.CreateTemp(name)
	must(t, err)
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	must(t, b.Commit(f, name, meta))
	must(t, b.Evict())
}

func readBlob(t *testing.T, b *Blobs, name string) []byte {
	t.Helper()
	f, err := b.Open(name)
	must(t, err)
	defer f.Close()
	data, err := io.ReadAll(f)
	must(t, err)
	return data
}

func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	must(t, err)
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func testdata(t *testing.T, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name))
	must(t, err)
	return data
}

func narHash(data []byte) narinfo.SHA256 { return narinfo.SumSHA256(data) }

// A real NAR (nix-store --dump) and the meta it was verified against.
type narBlob struct {
	data []byte
	meta BlobMeta
}

func realNARs(t *testing.T) (dir, flat, dirXZ narBlob) {
	t.Helper()
	parse := func(name string) *narinfo.NarInfo {
		ni, err := narinfo.Parse(testdata(t, name), "/nix/store")
		must(t, err)
		return ni
	}
	dirNI := parse("nky79z6sva4a91x5rhaal11qxv99px76.narinfo")
	flatNI := parse("61aj7swkryfp2b20a5r82689lgcqy8dr.narinfo")

	dir.data = testdata(t, "dir.nar")
	dir.meta = BlobMeta{StorePath: dirNI.StorePath,
		NAR: verify.Expect{Compression: narinfo.CompressionNone, NarHash: narHash(dir.data), NarSize: uint64(len(dir.data))}}
	// Our hash of the bytes is the one Nix put in the narinfo.
	if dir.meta.NAR.NarHash != dirNI.NarHash || dir.meta.NAR.NarSize != dirNI.NarSize {
		t.Fatalf("dir.nar: %s %d, narinfo says %s %d", dir.meta.NAR.NarHash, dir.meta.NAR.NarSize, dirNI.NarHash, dirNI.NarSize)
	}

	flat.data = testdata(t, "flat.nar")
	content := narinfo.SumSHA256([]byte("flat file content\n"))
	flat.meta = BlobMeta{StorePath: flatNI.StorePath, NAR: verify.Expect{Compression: narinfo.CompressionNone,
		NarHash: narHash(flat.data), NarSize: uint64(len(flat.data)), Flat: content}}
	if flat.meta.NAR.NarHash != flatNI.NarHash || flatNI.CA != "fixed:"+content.String() {
		t.Fatalf("flat.nar does not match its narinfo")
	}

	dirXZ.data = testdata(t, "dir.nar.xz")
	dirXZ.meta = BlobMeta{StorePath: dirNI.StorePath, NAR: verify.Expect{Compression: narinfo.CompressionXZ,
		FileHash: dirNI.FileHash, FileSize: dirNI.FileSize, NarHash: dirNI.NarHash, NarSize: dirNI.NarSize}}
	if narHash(dirXZ.data) != dirNI.FileHash || dirNI.Compression != narinfo.CompressionXZ {
		t.Fatalf("dir.nar.xz is not the narinfo's file")
	}
	return dir, flat, dirXZ
}

func TestBlobCommitOpenRemove(t *testing.T) {
	_, state, b := newBlobs(t, 0)
	dir, _, _ := realNARs(t)
	const name = "1d5wv32xxc3zz9rv66d13ajla2r8zl68wqdlfhy92njh782rw78v.nar"

	f, err := b.CreateTemp(name)
	must(t, err)
	if _, err := f.Write(dir.data); err != nil {
		t.Fatal(err)
	}
	must(t, f.Sync())
	// Fully written but not committed: never served, never listed.
	if _, err := b.Open(name); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Open before Commit: %v", err)
	}
	if n := dirEntries(t, filepath.Join(state, "blobs")); len(n) != 0 {
		t.Fatalf("blob dir before Commit: %v", n)
	}
	if len(b.Names()) != 0 || b.Size() != 0 || b.Has(name) {
		t.Fatalf("Names %v, Size %d, Has %v before Commit", b.Names(), b.Size(), b.Has(name))
	}
	if filepath.Dir(f.Name()) != filepath.Join(state, "tmp") {
		t.Errorf("temp file %s is not in the temp dir", f.Name())
	}

	before := time.Now()
	must(t, b.Commit(f, name, dir.meta))
	if _, err := f.Write([]byte("x")); err == nil {
		t.Error("Commit left the temp file open")
	}
	if n := dirEntries(t, filepath.Join(state, "tmp")); len(n) != 0 {
		t.Errorf("temp dir after Commit: %v", n)
	}
	if got := readBlob(t, b, name); !bytes.Equal(got, dir.data) {
		t.Error("Open returned other bytes")
	}
	if !slices.Equal(b.Names(), []string{name}) || b.Size() != int64(len(dir.data)) || !b.Has(name) {
		t.Errorf("Names %v, Size %d, Has %v", b.Names(), b.Size(), b.Has(name))
	}
	m, err := b.Meta(name)
	must(t, err)
	if m == nil || m.Size != int64(len(dir.data)) || m.NAR != dir.meta.NAR || m.StorePath != dir.meta.StorePath ||
		m.Added.Before(before) || !m.LastUsed.Equal(m.Added) {
		t.Errorf("Meta = %+v", m)
	}
	if b.Path(name) != filepath.Join(state, "blobs", name) {
		t.Errorf("Path = %s", b.Path(name))
	}

	// Committing the same blob again (a second download) does not count it twice.
	commit(t, b, name, dir.data, dir.meta)
	if b.Size() != int64(len(dir.data)) {
		t.Errorf("Size after re-commit = %d", b.Size())
	}

	must(t, b.Remove(name))
	if _, err := b.Open(name); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open after Remove: %v", err)
	}
	if m, _ := b.Meta(name); m != nil {
		t.Errorf("Meta after Remove: %+v", m)
	}
	if b.Has(name) {
		t.Error("Has after Remove")
	}
	if n := dirEntries(t, filepath.Join(state, "blobs")); len(n) != 0 || b.Size() != 0 || len(b.Names()) != 0 {
		t.Errorf("after Remove: files %v, Size %d, Names %v", n, b.Size(), b.Names())
	}
	must(t, b.Remove(name)) // removing an absent blob is fine

	// Discard drops a temp file.
	f, err = b.CreateTemp(name)
	must(t, err)
	b.Discard(f)
	if n := dirEntries(t, filepath.Join(state, "tmp")); len(n) != 0 {
		t.Errorf("temp dir after Discard: %v", n)
	}
	if _, err := b.Open(name); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open after Discard: %v", err)
	}
}

func TestBlobNames(t *testing.T) {
	_, state, b := newBlobs(t, 0)
	// A file next to the blob dir that a path escape would reach.
	must(t, os.WriteFile(filepath.Join(state, "secret"), []byte("x"), 0o600))
	for _, name := range []string{"", ".", "..", "../secret", "a/b", `a\b`, ".hidden", "/etc/passwd"} {
		if f, err := b.CreateTemp(name); err == nil {
			b.Discard(f)
			t.Errorf("CreateTemp(%q) succeeded", name)
		}
		if f, err := b.Open(name); err == nil {
			f.Close()
			t.Errorf("Open(%q) succeeded", name)
		}
		if err := b.Remove(name); err == nil {
			t.Errorf("Remove(%q) succeeded", name)
		}
	}
	if _, err := os.Stat(filepath.Join(state, "secret")); err != nil {
		t.Errorf("file outside the blob dir touched: %v", err)
	}
}

// OpenBlobs after a crash: a partial download in tmp, an index entry whose
// file never made it, a renamed file that was never indexed.
func TestOpenBlobsReconcile(t *testing.T) {
	db, _ := openTestDB(t)
	state := t.TempDir()
	b, err := OpenBlobs(db, state, 0)
	must(t, err)
	dir, flat, _ := realNARs(t)
	commit(t, b, "good.nar", dir.data, dir.meta)
	must(t, b.Close())

	// The crash states, written by hand.
	must(t, os.WriteFile(filepath.Join(state, "tmp", "partial.nar.123456"), dir.data[:100], 0o600))
	must(t, os.MkdirAll(filepath.Join(state, "tmp", "sub"), 0o700))
	must(t, os.WriteFile(filepath.Join(state, "blobs", "orphan.nar"), flat.data, 0o600))
	must(t, db.update(func(tx *bolt.Tx) error {
		if err := put(tx, bucketBlobs, "ghost.nar", BlobMeta{Size: 12345, StorePath: "/nix/store/x",
			NAR: verify.Expect{NarHash: flat.meta.NAR.NarHash, NarSize: 1}}); err != nil {
			return err
		}
		// An internal key, as earlier versions' health probe left in this bucket.
		return tx.Bucket(bucketBlobs).Put([]byte("\x00healthz"), nil)
	}))
	must(t, db.Writable())

	b, err = OpenBlobs(db, state, 0)
	must(t, err)
	if n := dirEntries(t, filepath.Join(state, "tmp")); len(n) != 0 {
		t.Errorf("leftover temp files: %v", n)
	}
	if n := dirEntries(t, filepath.Join(state, "blobs")); !slices.Equal(n, []string{"good.nar"}) {
		t.Errorf("blob dir: %v", n)
	}
	if m, _ := b.Meta("ghost.nar"); m != nil {
		t.Errorf("index entry without file kept: %+v", m)
	}
	if _, err := b.Open("ghost.nar"); err == nil {
		t.Error("ghost blob opened")
	}
	if _, err := b.Open("orphan.nar"); err == nil {
		t.Error("unindexed blob opened")
	}
	if !slices.Equal(b.Names(), []string{"good.nar"}) || b.Size() != int64(len(dir.data)) {
		t.Errorf("Names %v, Size %d", b.Names(), b.Size())
	}
	if got := readBlob(t, b, "good.nar"); !bytes.Equal(got, dir.data) {
		t.Error("good blob damaged")
	}
	// The internal key survived and is not a blob; the health probe's own
	// key (in the meta bucket) is untouched.
	must(t, db.view(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketBlobs).Get([]byte("\x00healthz")) == nil {
			t.Error("internal key in the blobs bucket removed")
		}
		if tx.Bucket(bucketMeta).Get(keyHealth) == nil {
			t.Error("health probe key removed")
		}
		return nil
	}))
	if b.Has("\x00healthz") {
		t.Error("internal key counted as a blob")
	}
	// The temp dir is usable again.
	commit(t, b, "next.nar", flat.data, flat.meta)
}

func TestBlobsEvictLRU(t *testing.T) {
	_, _, b := newBlobs(t, 350)
	var mu sync.Mutex
	var evictions [][2]int64
	b.OnEvict(func(n int, bytes int64) {
		mu.Lock()
		evictions = append(evictions, [2]int64{int64(n), bytes})
		mu.Unlock()
	})
	data := func(c byte, n int) []byte { return bytes.Repeat([]byte{c}, n) }
	meta := BlobMeta{NAR: verify.Expect{Compression: narinfo.CompressionNone, NarHash: narHash(nil), NarSize: 1}}
	tick := func() { time.Sleep(2 * time.Millisecond) } // distinct last-used times

	commit(t, b, "a", data('a', 100), meta)
	tick()
	commit(t, b, "b", data('b', 100), meta)
	tick()
	commit(t, b, "c", data('c', 100), meta)
	tick()
	readBlob(t, b, "a") // a is now the most recently used
	tick()
	if len(evictions) != 0 || b.Size() != 300 {
		t.Fatalf("evicted below maxSize: %v, Size %d", evictions, b.Size())
	}
	// Keep b open while it is evicted: a client being served keeps reading.
	fb, err := b.Open("b")
	must(t, err)
	defer fb.Close()
	tick()
	readBlob(t, b, "a")
	tick()

	commit(t, b, "d", data('d', 100), meta) // 400 > 350: the LRU one (c) goes
	if !slices.Equal(b.Names(), []string{"a", "b", "d"}) || b.Size() != 300 {
		t.Fatalf("after d: Names %v, Size %d", b.Names(), b.Size())
	}
	if !slices.Equal(evictions, [][2]int64{{1, 100}}) {
		t.Errorf("evictions = %v", evictions)
	}
	tick()

	commit(t, b, "e", data('e', 200), meta) // 500: b (then a) are the oldest
	if !slices.Equal(b.Names(), []string{"d", "e"}) || b.Size() != 300 {
		t.Fatalf("after e: Names %v, Size %d", b.Names(), b.Size())
	}
	if !slices.Equal(evictions, [][2]int64{{1, 100}, {2, 200}}) {
		t.Errorf("evictions = %v", evictions)
	}
	if got, err := io.ReadAll(fb); err != nil || !bytes.Equal(got, data('b', 100)) {
		t.Errorf("reading an evicted blob that was open: %v", err)
	}
	for _, gone := range []string{"a", "b", "c"} {
		if _, err := b.Open(gone); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Open(%s) after eviction: %v", gone, err)
		}
		if _, err := os.Stat(b.Path(gone)); !os.IsNotExist(err) {
			t.Errorf("%s still on disk", gone)
		}
	}

	// A blob larger than maxSize alone does not stay.
	commit(t, b, "huge", data('h', 400), meta)
	if b.Size() > 350 {
		t.Errorf("Size %d > maxSize after a huge blob (Names %v)", b.Size(), b.Names())
	}
}

// Close persists last-used times: the LRU order survives a restart.
func TestBlobsClosePersistsLastUsed(t *testing.T) {
	db, _ := openTestDB(t)
	state := t.TempDir()
	b, err := OpenBlobs(db, state, 250)
	must(t, err)
	meta := BlobMeta{NAR: verify.Expect{Compression: narinfo.CompressionNone, NarHash: narHash(nil), NarSize: 1}}
	commit(t, b, "old", bytes.Repeat([]byte{1}, 100), meta)
	time.Sleep(2 * time.Millisecond)
	commit(t, b, "new", bytes.Repeat([]byte{2}, 100), meta)
	time.Sleep(2 * time.Millisecond)
	readBlob(t, b, "old") // "old" is now the most recently used

	mOld, _ := b.Meta("old")
	mNew, _ := b.Meta("new")
	if !mOld.LastUsed.Before(mNew.LastUsed) {
		t.Fatalf("setup: Open already persisted LastUsed")
	}
	must(t, b.Close())
	mOld, _ = b.Meta("old")
	if !mOld.LastUsed.After(mNew.LastUsed) || !mOld.Added.Before(mNew.Added) {
		t.Fatalf("Close did not persist LastUsed: old %+v, new %+v", mOld, mNew)
	}

	b, err = OpenBlobs(db, state, 250)
	must(t, err)
	if b.Size() != 200 {
		t.Fatalf("Size after reopen = %d", b.Size())
	}
	commit(t, b, "third", bytes.Repeat([]byte{3}, 100), meta)
	if !slices.Equal(b.Names(), []string{"old", "third"}) {
		t.Errorf("after restart the least recently used should go: Names %v", b.Names())
	}
}

func TestVerifyAll(t *testing.T) {
	_, _, b := newBlobs(t, 0)
	dir, flat, dirXZ := realNARs(t)

	commit(t, b, "dir.nar", dir.data, dir.meta)
	commit(t, b, "flat.nar", flat.data, flat.meta)
	commit(t, b, "dir.nar.xz", dirXZ.data, dirXZ.meta)
	commit(t, b, "flipped.nar", dir.data, dir.meta)
	commit(t, b, "truncated.nar", dir.data, dir.meta)
	commit(t, b, "flipped.nar.xz", dirXZ.data, dirXZ.meta)
	commit(t, b, "flat-swapped.nar", dir.data, BlobMeta{StorePath: flat.meta.StorePath, NAR: verify.Expect{
		Compression: narinfo.CompressionNone, NarHash: dir.meta.NAR.NarHash, NarSize: dir.meta.NAR.NarSize, Flat: flat.meta.NAR.Flat}})
	commit(t, b, "deleted.nar", flat.data, flat.meta)

	// Damage on disk after the blobs were verified and committed.
	flip := func(name string, at int) {
		data, err := os.ReadFile(b.Path(name))
		must(t, err)
		data[at] ^= 0x20
		must(t, os.WriteFile(b.Path(name), data, 0o600))
	}
	flip("flipped.nar", len(dir.data)/2)
	flip("flipped.nar.xz", len(dirXZ.data)/2)
	must(t, os.Truncate(b.Path("truncated.nar"), int64(len(dir.data)-8)))
	must(t, os.Remove(b.Path("deleted.nar")))

	checked, failed, err := b.VerifyAll()
	must(t, err)
	if checked != 8 {
		t.Errorf("checked %d blobs, want 8", checked)
	}
	var names []string
	for _, f := range failed {
		names = append(names, f.Blob)
		if f.Error == "" || f.StorePath == "" {
			t.Errorf("failure without detail: %+v", f)
		}
	}
	slices.Sort(names)
	want := []string{"deleted.nar", "flat-swapped.nar", "flipped.nar", "flipped.nar.xz", "truncated.nar"}
	if !slices.Equal(names, want) {
		t.Errorf("failed = %v, want %v (%+v)", names, want, failed)
	}
	good := []string{"dir.nar", "dir.nar.xz", "flat.nar"}
	if !slices.Equal(b.Names(), good) {
		t.Errorf("kept %v, want %v", b.Names(), good)
	}
	for _, n := range want {
		if _, err := os.Stat(b.Path(n)); !os.IsNotExist(err) {
			t.Errorf("%s still on disk", n)
		}
		if m, _ := b.Meta(n); m != nil {
			t.Errorf("%s still indexed", n)
		}
	}
	if got := readBlob(t, b, "dir.nar.xz"); !bytes.Equal(got, dirXZ.data) {
		t.Error("good blob changed")
	}
	if want := int64(len(dir.data) + len(dirXZ.data) + len(flat.data)); b.Size() != want {
		t.Errorf("Size = %d, want %d", b.Size(), want)
	}

	checked, failed, err = b.VerifyAll()
	if err != nil || checked != 3 || len(failed) != 0 {
		t.Errorf("second VerifyAll: %d, %v, %v", checked, failed, err)
	}
}

// Commits, opens and evictions from many goroutines, for the race detector.
func TestBlobsConcurrent(t *testing.T) {
	_, _, b := newBlobs(t, 1000)
	var mu sync.Mutex
	evicted := 0
	b.OnEvict(func(n int, _ int64) { mu.Lock(); evicted += n; mu.Unlock() })
	meta := BlobMeta{NAR: verify.Expect{Compression: narinfo.CompressionNone, NarHash: narHash(nil), NarSize: 1}}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 10 {
				name := string(rune('a'+g)) + string(rune('a'+i))
				f, err := b.CreateTemp(name)
				if err != nil {
					t.Error(err)
					return
				}
				f.Write(bytes.Repeat([]byte{byte(i)}, 100))
				if err := b.Commit(f, name, meta); err != nil {
					t.Error(err)
					return
				}
				if err := b.Evict(); err != nil {
					t.Error(err)
					return
				}
				if f, err := b.Open(name); err == nil {
					f.Close()
				}
				b.Names()
				b.Size()
			}
		})
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if b.Size() > 1000 || len(b.Names()) != 40-evicted {
		t.Errorf("Size %d, %d names, %d evicted", b.Size(), len(b.Names()), evicted)
	}
}

// A blob damaged on disk is caught at open by its size, and by Check by its
// hashes; either way it is dropped, never served.
func TestDamagedBlobDropped(t *testing.T) {
	_, _, b := newBlobs(t, 0)
	dir, _, dirXZ := realNARs(t)
	commit(t, b, "short.nar", dir.data, dir.meta)
	commit(t, b, "long.nar", dir.data, dir.meta)
	commit(t, b, "flipped.nar.xz", dirXZ.data, dirXZ.meta)
	commit(t, b, "good.nar", dir.data, dir.meta)
	must(t, os.Truncate(b.Path("short.nar"), int64(len(dir.data)-1)))
	f, err := os.OpenFile(b.Path("long.nar"), os.O_APPEND|os.O_WRONLY, 0)
	must(t, err)
	f.Write([]byte("x"))
	f.Close()
	for _, name := range []string{"short.nar", "long.nar"} {
		if f, err := b.Open(name); !errors.Is(err, ErrDamaged) {
			if f != nil {
				f.Close()
			}
			t.Errorf("Open(%s) of a blob of the wrong size: %v, want ErrDamaged", name, err)
		}
		if b.Has(name) {
			t.Errorf("%s still indexed after a damaged open", name)
		}
	}
	data, err := os.ReadFile(b.Path("flipped.nar.xz"))
	must(t, err)
	data[len(data)/2] ^= 1
	must(t, os.WriteFile(b.Path("flipped.nar.xz"), data, 0o600))
	if _, failed, err := b.Check("flipped.nar.xz"); err != nil || failed == nil || b.Has("flipped.nar.xz") {
		t.Errorf("Check of a flipped blob: %v %v, still there %v", failed, err, b.Has("flipped.nar.xz"))
	}
	if n, failed, err := b.Check("good.nar"); err != nil || failed != nil || n != int64(len(dir.data)) {
		t.Errorf("Check of a good blob: %d %v %v", n, failed, err)
	}
	if got := readBlob(t, b, "good.nar"); !bytes.Equal(got, dir.data) {
		t.Error("good blob changed")
	}
}

// Downloads in progress count against max_size: their bytes evict
// least-recently-used blobs, and bytes that cannot fit are refused.
func TestTempBytesCount(t *testing.T) {
	_, _, b := newBlobs(t, 3000)
	dir, _, _ := realNARs(t)
	if len(dir.data) > 1000 {
		t.Skipf("fixture NAR of %d bytes is too big for this test", len(dir.data))
	}
	commit(t, b, "old.nar", dir.data, dir.meta)
	commit(t, b, "new.nar", dir.data, dir.meta)
	tmp, err := b.CreateTemp("big.nar")
	must(t, err)
	// Room for this download means evicting the least recently used blob.
	if err := b.Grow(tmp, 3000-int64(len(dir.data))); err != nil {
		t.Fatalf("Grow within max_size after eviction: %v", err)
	}
	if b.Has("old.nar") || !b.Has("new.nar") || b.TempSize() != 3000-int64(len(dir.data)) {
		t.Errorf("after Grow: old %v new %v temp %d", b.Has("old.nar"), b.Has("new.nar"), b.TempSize())
	}
	other, err := b.CreateTemp("other.nar")
	must(t, err)
	if err := b.Grow(other, 3001); !errors.Is(err, ErrNoRoom) || !b.Has("new.nar") {
		t.Errorf("Grow past max_size: %v (new.nar kept: %v), want ErrNoRoom and no eviction for nothing", err, b.Has("new.nar"))
	}
	b.Discard(other)
	b.Discard(tmp)
	if b.TempSize() != 0 {
		t.Errorf("temp bytes after discarding every download: %d", b.TempSize())
	}
}
