package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
)

// openLocal opens a file under the file:// cache root. os.Root confines the
// lookup to the directory, including through symlinks, so a cache dir with a
// hostile symlink still cannot leak files from elsewhere. The root is opened
// per call so a remounted or recreated directory is picked up.
//
// A missing root directory is Unavailable, not NotFound: an unmounted cache
// would otherwise produce 404s that Nix remembers for an hour. It is also
// the one failure that says the upstream is down; once the root is open,
// problems are the file's own.
func (c *Client) openLocal(ctx context.Context, rel string, ref *url.URL) (*os.File, fs.FileInfo, verdict, error) {
	f, st, err := c.openUnderRoot(ctx, rel, ref)
	switch {
	case err == nil:
		return f, st, answered, nil
	case errors.Is(err, errNoRoot):
		return nil, nil, failing, err
	case ctx.Err() != nil || errors.Is(err, ErrInvalidPath):
		return nil, nil, noVerdict, err
	default:
		return nil, nil, answered, err
	}
}

// errNoRoot marks the failure to open the cache directory itself.
var errNoRoot = errors.New("cannot open the cache directory")

func (c *Client) openUnderRoot(ctx context.Context, rel string, ref *url.URL) (*os.File, fs.FileInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, c.unavailable(0, "%s: %w", rel, err)
	}
	if ref.RawQuery != "" || ref.ForceQuery {
		return nil, nil, fmt.Errorf("upstream %s: %q: a query is meaningless in a file:// cache: %w", c.name, truncate(rel), ErrInvalidPath)
	}
	root, err := os.OpenRoot(c.dir)
	if err != nil {
		return nil, nil, c.unavailable(0, "%w: %w", errNoRoot, err)
	}
	defer root.Close()
	name := filepath.FromSlash(ref.Path)
	// Stat before Open: opening a FIFO placed in the cache would block.
	st, err := root.Stat(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, c.notFound(rel, "no such file")
		}
		return nil, nil, c.unavailable(0, "%s: %w", rel, err)
	}
	if st.IsDir() {
		return nil, nil, c.notFound(rel, "is a directory")
	}
	if !st.Mode().IsRegular() {
		return nil, nil, c.unavailable(0, "%s: not a regular file", rel)
	}
	f, err := root.Open(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) { // removed since the Stat
			return nil, nil, c.notFound(rel, "no such file")
		}
		return nil, nil, c.unavailable(0, "%s: %w", rel, err)
	}
	st, err = f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, c.unavailable(0, "%s: %w", rel, err)
	}
	return f, st, nil
}

func (c *Client) getFile(ctx context.Context, rel string, ref *url.URL, maxBytes int64) ([]byte, verdict, error) {
	f, st, v, err := c.openLocal(ctx, rel, ref)
	if err != nil {
		return nil, v, err
	}
	defer f.Close()
	if st.Size() > maxBytes {
		return nil, v, c.unavailable(0, "%s: %d bytes, limit %d: %w", rel, st.Size(), maxBytes, ErrTooLarge)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxBytes+1))
	if err != nil {
		return nil, v, c.unavailable(0, "reading %s: %w", rel, err)
	}
	if int64(len(data)) > maxBytes { // grew since the Stat
		return nil, v, c.unavailable(0, "%s: more than %d bytes: %w", rel, maxBytes, ErrTooLarge)
	}
	return data, v, nil
}

// openFile opens a file for Open; release gives back the connection slot
// when the body is closed. Files are not checked for HTML: nothing between
// the cache and us could substitute an error page.
func (c *Client) openFile(ctx context.Context, rel string, ref *url.URL, release func()) (io.ReadCloser, int64, verdict, error) {
	f, st, v, err := c.openLocal(ctx, rel, ref)
	if err != nil {
		return nil, 0, v, err
	}
	return &fileBody{c: c, rel: rel, f: f, want: st.Size(), release: release}, st.Size(), v, nil
}

// fileBody reports a file that shrank while being read (a cache being
// rewritten under us) as a truncated transfer, like a short HTTP body.
type fileBody struct {
	c       *Client
	rel     string
	f       *os.File
	release func() // gives back the connection slot; idempotent
	want    int64
	got     int64
	err     error
}

func (b *fileBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.f.Read(p)
	b.got += int64(n)
	switch {
	case err == nil:
		return n, nil
	case err == io.EOF && b.got >= b.want:
		b.err = io.EOF
		return n, io.EOF
	case err == io.EOF:
		err = io.ErrUnexpectedEOF
	}
	b.err = b.c.unavailable(0, "reading %s: after %d of %d bytes: %w", b.rel, b.got, b.want, err)
	return n, b.err
}

func (b *fileBody) Close() error {
	defer b.release()
	return b.f.Close()
}
