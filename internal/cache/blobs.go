package cache

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Blobs is the directory of verified NAR files, named as the proxy serves
// them, indexed in the DB's blobs bucket. A blob becomes visible only by
// rename after fsync, and is indexed after the rename: a crash at any point
// leaves at worst a temp file or an unindexed blob, both removed by Open.
type Blobs struct {
	db      *DB
	dir     string // final blobs
	tmp     string // downloads in progress
	maxSize int64

	mu       sync.Mutex
	size     int64                // sum of indexed blob sizes
	lastUsed map[string]time.Time // in memory; persisted by SaveUsage (periodically) and Close
	// sizes holds the indexed size of every blob in lastUsed. Remove and
	// evict account with it rather than with a stat of the file, which
	// drifts when a file is truncated or deleted behind our back, and they
	// count a blob as removed only when it was still in the map, so that
	// concurrent evictions neither count one blob twice nor evict more than
	// needed.
	sizes map[string]int64
	// temps holds the bytes written so far to each temp file (by path);
	// temp is their sum. They count against maxSize like blobs do.
	temps   map[string]int64
	temp    int64
	onEvict func(n int, bytes int64)
}

// OpenBlobs prepares stateDir/blobs and stateDir/tmp, removes leftovers of a
// crash and reconciles the index with the files on disk.
func OpenBlobs(db *DB, stateDir string, maxSize int64) (*Blobs, error) {
	b := &Blobs{db: db, dir: filepath.Join(stateDir, "blobs"), tmp: filepath.Join(stateDir, "tmp"),
		maxSize: maxSize, lastUsed: map[string]time.Time{}, sizes: map[string]int64{}, temps: map[string]int64{}}
	if err := os.RemoveAll(b.tmp); err != nil {
		return nil, fmt.Errorf("clear temp dir: %w", err)
	}
	for _, d := range []string{b.dir, b.tmp} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	if err := b.reconcile(); err != nil {
		return nil, err
	}
	return b, nil
}

// reconcile drops index entries without a file and files without an entry.
func (b *Blobs) reconcile() error {
	onDisk := map[string]bool{}
	entries, err := os.ReadDir(b.dir)
	if err != nil {
		return fmt.Errorf("read blob dir: %w", err)
	}
	for _, e := range entries {
		onDisk[e.Name()] = true
	}
	return b.db.update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketBlobs)
		var stale [][]byte
		err := bk.ForEach(func(k, v []byte) error {
			if k[0] == 0 {
				return nil
			}
			name := string(k)
			if !onDisk[name] {
				stale = append(stale, append([]byte(nil), k...))
				return nil
			}
			delete(onDisk, name)
			var m BlobMeta
			if err := json.Unmarshal(v, &m); err != nil {
				return fmt.Errorf("decode blob index %s: %w", name, err)
			}
			b.size += m.Size
			b.lastUsed[name] = m.LastUsed
			b.sizes[name] = m.Size
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range stale {
			if err := bk.Delete(k); err != nil {
				return err
			}
		}
		for name := range onDisk {
			if err := os.Remove(filepath.Join(b.dir, name)); err != nil {
				return fmt.Errorf("remove unindexed blob: %w", err)
			}
		}
		return nil
	})
}

// OnEvict sets a callback for evictions (metrics).
func (b *Blobs) OnEvict(fn func(n int, bytes int64)) { b.onEvict = fn }

// validName keeps blob names to one path element.
func validName(name string) error {
	if name == "" || strings.ContainsAny(name, "/\\") || name == "." || name == ".." || name[0] == '.' {
		return fmt.Errorf("invalid blob name %q", name)
	}
	return nil
}

// CreateTemp creates a temp file for a download of blob name.
func (b *Blobs) CreateTemp(name string) (*os.File, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(b.tmp, name+".*")
	if err != nil {
		return nil, fmt.Errorf("create temp blob: %w", err)
	}
	return f, nil
}

// ErrNoRoom is returned by Grow when the bytes do not fit under max_size
// even with every blob evicted (other downloads hold the space).
var ErrNoRoom = errors.New("no room under cache.max_size")

// Grow accounts for n more bytes about to be written to temp file f,
// evicting least-recently-used blobs to make room. It fails, counting
// nothing, when they do not fit even then.
func (b *Blobs) Grow(f *os.File, n int64) error {
	b.mu.Lock()
	over := b.maxSize > 0 && b.size+b.temp+n > b.maxSize
	hopeless := b.maxSize > 0 && b.temp+n > b.maxSize // evicting every blob would not help
	b.mu.Unlock()
	if hopeless {
		return fmt.Errorf("%w: %d bytes of downloads in progress, %d more wanted, limit %d", ErrNoRoom, b.temp, n, b.maxSize)
	}
	if over {
		if err := b.evict(n); err != nil {
			return err
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.maxSize > 0 && b.size+b.temp+n > b.maxSize {
		return fmt.Errorf("%w: %d bytes of blobs and %d of downloads in progress, %d more wanted, limit %d", ErrNoRoom, b.size, b.temp, n, b.maxSize)
	}
	b.temps[f.Name()] += n
	b.temp += n
	return nil
}

// releaseTemp stops counting a temp file.
func (b *Blobs) releaseTemp(name string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.temp -= b.temps[name]
	delete(b.temps, name)
}

// Commit makes a fully written and verified temp file the blob name: fsync,
// rename, fsync the directory, then index it with meta. f is closed. It
// does not evict: callers run Evict once readers of the new blob are served.
func (b *Blobs) Commit(f *os.File, name string, meta BlobMeta) error {
	tmpName := f.Name()
	defer b.releaseTemp(tmpName)
	size, err := f.Seek(0, 2)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmpName, filepath.Join(b.dir, name))
	}
	if err == nil {
		err = syncDir(b.dir)
	}
	if err != nil {
		os.Remove(tmpName)
		return fmt.Errorf("commit blob %s: %w", name, err)
	}
	now := time.Now()
	err = b.db.update(func(tx *bolt.Tx) error {
		meta.Size, meta.Added, meta.LastUsed = size, now, now
		return put(tx, bucketBlobs, name, meta)
	})
	if err != nil {
		os.Remove(filepath.Join(b.dir, name))
		return fmt.Errorf("index blob %s: %w", name, err)
	}
	b.mu.Lock()
	b.size += size - b.sizes[name] // a second commit of name replaces the first
	b.sizes[name] = size
	b.lastUsed[name] = now
	b.mu.Unlock()
	return nil
}

// Discard removes a temp file that will never be committed.
func (b *Blobs) Discard(f *os.File) {
	b.releaseTemp(f.Name())
	f.Close()
	os.Remove(f.Name())
}

// ErrDamaged is returned by Open for a blob whose size on disk is not the
// size it was verified at (truncated or grown behind our back); Open has
// dropped it.
var ErrDamaged = errors.New("cached blob damaged on disk")

// Open opens a blob for serving and marks it used. Its size is checked
// against the index at every open, so that a truncated blob is never sent
// as a complete response; a damaged blob is dropped.
func (b *Blobs) Open(name string) (*os.File, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	b.mu.Lock()
	_, ok := b.lastUsed[name]
	size := b.sizes[name]
	if ok {
		b.lastUsed[name] = time.Now()
	}
	b.mu.Unlock()
	if !ok {
		return nil, os.ErrNotExist
	}
	f, err := os.Open(filepath.Join(b.dir, name))
	if err != nil {
		b.remove(name)
		return nil, fmt.Errorf("%w: %s: %v", ErrDamaged, name, err)
	}
	if st, err := f.Stat(); err != nil || st.Size() != size {
		f.Close()
		b.remove(name)
		got := int64(-1)
		if st != nil {
			got = st.Size()
		}
		return nil, fmt.Errorf("%w: %s is %d bytes, verified at %d", ErrDamaged, name, got, size)
	}
	return f, nil
}

// Has reports whether blob name is in the store.
func (b *Blobs) Has(name string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	_, ok := b.lastUsed[name]
	return ok
}

// Free returns the bytes free for unprivileged writes on the blob store's
// file system.
func (b *Blobs) Free() (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(b.dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", b.dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// Path returns the file path of a blob (for re-hashing).
func (b *Blobs) Path(name string) string { return filepath.Join(b.dir, name) }

// Meta returns the index entry of a blob.
func (b *Blobs) Meta(name string) (m *BlobMeta, err error) {
	err = b.db.view(func(tx *bolt.Tx) error {
		m, err = get[BlobMeta](tx, bucketBlobs, name)
		return err
	})
	return m, err
}

// Names lists the indexed blobs.
func (b *Blobs) Names() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]string, 0, len(b.lastUsed))
	for n := range b.lastUsed {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Size returns the bytes held by indexed blobs.
func (b *Blobs) Size() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.size
}

// MaxSize is cache.max_size (0: no limit).
func (b *Blobs) MaxSize() int64 { return b.maxSize }

// TempSize returns the bytes written by downloads in progress.
func (b *Blobs) TempSize() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.temp
}

// Remove drops a blob and its index entry.
func (b *Blobs) Remove(name string) error {
	_, _, err := b.remove(name)
	return err
}

// remove drops a blob; removed reports whether this call took it out of
// the in-memory index (and so freed its size), which is what eviction counts.
func (b *Blobs) remove(name string) (freed int64, removed bool, err error) {
	if err := validName(name); err != nil {
		return 0, false, err
	}
	// Stop serving it first; a failure below leaves at worst an unserved
	// index entry or file, which OpenBlobs reconciles.
	b.mu.Lock()
	if _, ok := b.lastUsed[name]; ok {
		freed, removed = b.sizes[name], true
		b.size -= freed
		delete(b.lastUsed, name)
		delete(b.sizes, name)
	}
	b.mu.Unlock()
	err = b.db.update(func(tx *bolt.Tx) error { return tx.Bucket(bucketBlobs).Delete([]byte(name)) })
	if err != nil {
		return freed, removed, fmt.Errorf("unindex blob %s: %w", name, err)
	}
	if err := os.Remove(filepath.Join(b.dir, name)); err != nil && !os.IsNotExist(err) {
		return freed, removed, fmt.Errorf("remove blob %s: %w", name, err)
	}
	return freed, removed, nil
}

// Evict removes least-recently-used blobs until blobs and downloads in
// progress together are within maxSize. An open file keeps its data on
// Linux, so a client being served an evicted blob is unaffected.
func (b *Blobs) Evict() error { return b.evict(0) }

// evict makes room for want more bytes.
func (b *Blobs) evict(want int64) error {
	b.mu.Lock()
	if b.maxSize <= 0 || b.size+b.temp+want <= b.maxSize {
		b.mu.Unlock()
		return nil
	}
	names := make([]string, 0, len(b.lastUsed))
	for n := range b.lastUsed {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool { return b.lastUsed[names[i]].Before(b.lastUsed[names[j]]) })
	b.mu.Unlock()

	n, freed := 0, int64(0)
	for _, name := range names {
		// Re-check: another Commit may be evicting at the same time.
		b.mu.Lock()
		over := b.size+b.temp+want > b.maxSize
		b.mu.Unlock()
		if !over {
			break
		}
		size, removed, err := b.remove(name)
		if err != nil {
			return err
		}
		if removed {
			n++
			freed += size
		}
	}
	if n > 0 && b.onEvict != nil {
		b.onEvict(n, freed)
	}
	return nil
}

// Close persists the last-used times so LRU order survives a restart.
func (b *Blobs) Close() error { return b.SaveUsage() }

// SaveUsage persists the last-used times; the server calls it now and then
// so that LRU order mostly survives a crash too.
func (b *Blobs) SaveUsage() error {
	b.mu.Lock()
	used := make(map[string]time.Time, len(b.lastUsed))
	for k, v := range b.lastUsed {
		used[k] = v
	}
	b.mu.Unlock()
	return b.db.update(func(tx *bolt.Tx) error {
		for name, t := range used {
			m, err := get[BlobMeta](tx, bucketBlobs, name)
			if err != nil || m == nil {
				continue
			}
			m.LastUsed = t
			if err := put(tx, bucketBlobs, name, m); err != nil {
				return err
			}
		}
		return nil
	})
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
