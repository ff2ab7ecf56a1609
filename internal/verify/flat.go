package verify

import (
	"bufio"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/nix-community/go-nix/pkg/nar"
)

// errFlatStopped tells the NAR parser to give up because the verifier is
// shutting down; it is never reported to callers.
var errFlatStopped = errors.New("verify: flat check stopped")

// flatChecker proves that a decompressed NAR holds exactly one non-executable
// regular file whose contents hash to want: the content address of a
// "fixed:sha256" (flat) or "text:sha256" store path. It parses the NAR with
// go-nix's reader in its own goroutine, fed through an io.Pipe, because that
// reader pulls from an io.Reader while the verifier pushes bytes.
type flatChecker struct {
	pw   *io.PipeWriter
	want narinfo.SHA256
	done chan struct{}
	err  error // *Error or nil; written before done is closed
}

func newFlatChecker(want narinfo.SHA256) *flatChecker {
	pr, pw := io.Pipe()
	f := &flatChecker{pw: pw, want: want, done: make(chan struct{})}
	go f.run(pr)
	return f
}

// write forwards decompressed bytes to the parser. It fails as soon as the
// parser has seen that the NAR cannot be a flat file.
func (f *flatChecker) write(p []byte) error {
	if _, err := f.pw.Write(p); err != nil {
		<-f.done
		if f.err != nil {
			return f.err
		}
		return &Error{Check: CheckNarHash, Detail: "content-address check stopped", Err: err}
	}
	return nil
}

// finish signals the end of the NAR and returns the parser's verdict.
func (f *flatChecker) finish() error {
	_ = f.pw.Close() // PipeWriter.Close always returns nil
	<-f.done
	return f.err
}

// stop makes the parser give up and waits for its goroutine to end.
func (f *flatChecker) stop() {
	f.pw.CloseWithError(errFlatStopped)
	<-f.done
}

func (f *flatChecker) run(pr *io.PipeReader) {
	defer close(f.done)
	err := checkFlat(pr, f.want)
	if err != nil {
		// Unblock the writer: nothing more needs to be read.
		pr.CloseWithError(err)
		if errors.Is(err, errFlatStopped) {
			return
		}
		f.err = &Error{Check: CheckNarHash, Detail: "content address: " + err.Error(), Err: err}
	}
}

func checkFlat(pr *io.PipeReader, want narinfo.SHA256) error {
	// go-nix reads tokens a few bytes at a time; buffering keeps that off the
	// pipe.
	br := bufio.NewReaderSize(pr, 64<<10)
	nr, err := nar.NewReader(br)
	if err != nil {
		return fmt.Errorf("not a NAR: %w", err)
	}
	// go-nix's parser goroutine only exits once Next has returned an error,
	// so every exit path fails the pipe and drains it.
	defer func() {
		pr.CloseWithError(errFlatStopped)
		for {
			if _, err := nr.Next(); err != nil {
				return
			}
		}
	}()

	hdr, err := nr.Next()
	if err != nil {
		return fmt.Errorf("reading NAR root: %w", err)
	}
	if hdr.Type != nar.TypeRegular {
		return fmt.Errorf("NAR root is a %s, want a single regular file", hdr.Type)
	}
	if hdr.Executable {
		// Nix refuses flat outputs that are executable; the bit is not part of
		// the flat hash, so accepting it would let it be flipped undetected.
		return errors.New("NAR root is an executable file, flat content addresses are non-executable")
	}
	h := sha256.New()
	n, err := io.Copy(h, nr)
	if err != nil {
		return fmt.Errorf("reading file contents: %w", err)
	}
	if n != hdr.Size {
		return fmt.Errorf("file contents: %d bytes, NAR says %d", n, hdr.Size)
	}
	if _, err := nr.Next(); err != io.EOF {
		if err == nil {
			return errors.New("NAR has more than one entry")
		}
		return fmt.Errorf("reading NAR end: %w", err)
	}
	// The NAR hash covers any bytes after the archive's end, but Nix would
	// not accept them either; a flat proof is about the whole stream.
	if extra, err := io.Copy(io.Discard, br); err != nil {
		return fmt.Errorf("after NAR end: %w", err)
	} else if extra > 0 {
		return fmt.Errorf("%d bytes after NAR end", extra)
	}
	if got := sum(h); got != want {
		return fmt.Errorf("file hashes to %s, store path says %s", got, want)
	}
	return nil
}
