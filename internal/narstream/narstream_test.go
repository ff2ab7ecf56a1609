package narstream

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// source is an upstream body the test controls: it hands out data up to
// a limit the test raises, then ends with end (nil: clean EOF).
type source struct {
	data  []byte
	mu    sync.Mutex
	cond  *sync.Cond
	lim   int
	off   int
	end   error
	opens atomic.Int32
	// cancelled is set when the download's context ends, as an HTTP body's
	// Read fails when its request is cancelled.
	cancelled error
}

func (s *source) watch(ctx context.Context) {
	go func() {
		<-ctx.Done()
		s.mu.Lock()
		s.cancelled = ctx.Err()
		s.mu.Unlock()
		s.cond.Broadcast()
	}()
}

func newSource(data []byte, lim int) *source {
	s := &source{data: data, lim: lim}
	s.cond = sync.NewCond(&s.mu)
	return s
}

func (s *source) release(lim int) {
	s.mu.Lock()
	s.lim = lim
	s.mu.Unlock()
	s.cond.Broadcast()
}

func (s *source) Read(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.off >= s.lim && s.off < len(s.data) && s.cancelled == nil {
		s.cond.Wait()
	}
	if s.cancelled != nil {
		return 0, s.cancelled
	}
	if s.off >= len(s.data) {
		if s.end != nil {
			return 0, s.end
		}
		return 0, io.EOF
	}
	n := copy(p, s.data[s.off:s.lim])
	s.off += n
	return n, nil
}

func (s *source) Close() error { return nil }

// harness records what the download did with its temp file.
type harness struct {
	t         *testing.T
	dir       string
	committed atomic.Int32
	discarded atomic.Int32
	doneErr   chan error
}

func newHarness(t *testing.T) *harness {
	return &harness{t: t, dir: t.TempDir(), doneErr: make(chan error, 1)}
}

func (h *harness) job(name string, e verify.Expect, src *source, size int64) Job {
	return Job{
		Name:   name,
		Expect: e,
		Open: func(ctx context.Context) (io.ReadCloser, int64, error) {
			src.opens.Add(1)
			src.watch(ctx)
			return src, size, nil
		},
		Temp:    func() (*os.File, error) { return os.CreateTemp(h.dir, name+".*") },
		Commit:  func(f *os.File) error { h.committed.Add(1); return f.Close() },
		Discard: func(f *os.File) { h.discarded.Add(1); f.Close(); os.Remove(f.Name()) },
		Done:    func(_ int64, err error) { h.doneErr <- err },
	}
}

func payload(n int) ([]byte, verify.Expect) {
	b := make([]byte, n)
	rand.New(rand.NewSource(int64(n))).Read(b)
	return b, verify.Expect{Compression: narinfo.CompressionNone, NarHash: narinfo.SumSHA256(b), NarSize: uint64(n)}
}

// One download, many readers, identical bytes; nobody gets the last
// Holdback bytes before the whole NAR is verified.
func TestFollowersShareOneDownloadAndHoldBack(t *testing.T) {
	data, e := payload(1 << 20)
	src := newSource(data, len(data)-1) // withhold the last byte
	h := newHarness(t)
	g := NewGroup()
	defer g.Close()

	const readers = 8
	var wg sync.WaitGroup
	got := make([][]byte, readers)
	errs := make([]error, readers)
	var maxSeen atomic.Int64
	for i := range readers {
		r, err := g.Join(context.Background(), h.job("nar-1", e, src, int64(len(data))), nil)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer r.Close()
			var buf bytes.Buffer
			p := make([]byte, 4096)
			for {
				n, err := r.Read(p)
				buf.Write(p[:n])
				if int64(buf.Len()) > maxSeen.Load() {
					maxSeen.Store(int64(buf.Len()))
				}
				if err == io.EOF {
					break
				}
				if err != nil {
					errs[i] = err
					break
				}
			}
			got[i] = buf.Bytes()
		}()
	}
	// While the upstream withholds its tail, readers stop Holdback short.
	deadline := time.Now().Add(5 * time.Second)
	for maxSeen.Load() < int64(len(data)-1-Holdback) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	if m := maxSeen.Load(); m != int64(len(data)-1-Holdback) {
		t.Fatalf("readers got %d bytes while %d had arrived, want exactly %d", m, len(data)-1, len(data)-1-Holdback)
	}
	src.release(len(data))
	wg.Wait()
	for i := range readers {
		if errs[i] != nil || !bytes.Equal(got[i], data) {
			t.Fatalf("reader %d: %d bytes, err %v", i, len(got[i]), errs[i])
		}
	}
	if n := src.opens.Load(); n != 1 {
		t.Errorf("upstream opened %d times, want 1", n)
	}
	if err := <-h.doneErr; err != nil || h.committed.Load() != 1 || h.discarded.Load() != 0 {
		t.Errorf("done %v, committed %d, discarded %d", err, h.committed.Load(), h.discarded.Load())
	}
	if g.Running("nar-1") {
		t.Error("download still in the table after it ended")
	}
}

// A NAR whose last bytes disagree fails every reader, is never committed,
// and Done learns the *verify.Error before any reader sees the end.
func TestMismatchFailsEveryReader(t *testing.T) {
	data, e := payload(300 << 10)
	bad := bytes.Clone(data)
	bad[len(bad)-1] ^= 1
	src := newSource(bad, len(bad))
	h := newHarness(t)
	g := NewGroup()
	defer g.Close()
	var doneBeforeReader atomic.Bool
	job := h.job("nar-2", e, src, int64(len(bad)))
	job.Done = func(_ int64, err error) {
		time.Sleep(10 * time.Millisecond) // a reader must not see the end yet
		doneBeforeReader.Store(true)
		h.doneErr <- err
	}
	r, err := g.Join(context.Background(), job, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	n, err := io.Copy(io.Discard, r)
	var ve *verify.Error
	if !errors.As(err, &ve) || ve.Check != verify.CheckNarHash {
		t.Fatalf("reader got %d bytes and %v, want a nar_hash *verify.Error", n, err)
	}
	if !doneBeforeReader.Load() {
		t.Error("the reader learned of the failure before Done ran")
	}
	if n > int64(len(bad)-Holdback) {
		t.Errorf("reader got %d bytes of a bad NAR, more than %d", n, len(bad)-Holdback)
	}
	if err := <-h.doneErr; !errors.As(err, &ve) || h.committed.Load() != 0 || h.discarded.Load() != 1 {
		t.Errorf("done %v, committed %d, discarded %d", err, h.committed.Load(), h.discarded.Load())
	}
}

// A broken transfer is a *TruncatedError; a stream of unknown length that
// ends early carries the verifier's verdict for the caller to weigh.
func TestTruncation(t *testing.T) {
	data, e := payload(200 << 10)
	for _, tc := range []struct {
		name          string
		end           error
		size          int64
		unknownLength bool
	}{
		{"reset", io.ErrUnexpectedEOF, int64(len(data)), false},
		{"clean end without length", nil, -1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newSource(data[:len(data)/2], len(data)/2)
			src.end = tc.end
			h := newHarness(t)
			g := NewGroup()
			defer g.Close()
			r, err := g.Join(context.Background(), h.job("nar-3", e, src, tc.size), nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = io.Copy(io.Discard, r)
			r.Close()
			var te *TruncatedError
			if !errors.As(err, &te) || (te.UnknownLength != nil) != tc.unknownLength {
				t.Fatalf("got %v, want *TruncatedError (unknown length %v)", err, tc.unknownLength)
			}
			if h.committed.Load() != 0 || h.discarded.Load() != 1 {
				t.Errorf("committed %d, discarded %d", h.committed.Load(), h.discarded.Load())
			}
		})
	}
}

// Joining a download of the same name with other expectations fails, and
// admit is asked only when a download would start.
func TestJoinRules(t *testing.T) {
	data, e := payload(100 << 10)
	src := newSource(data, 0)
	h := newHarness(t)
	g := NewGroup()
	r, err := g.Join(context.Background(), h.job("nar-4", e, src, int64(len(data))), func() error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	other := e
	other.Compression = narinfo.CompressionZstd
	if _, err := g.Join(context.Background(), h.job("nar-4", other, src, -1), nil); !errors.Is(err, ErrOtherVariant) {
		t.Errorf("other variant: %v", err)
	}
	admitted := false
	r2, err := g.Join(context.Background(), h.job("nar-4", e, src, int64(len(data))), func() error { admitted = true; return nil })
	if err != nil || admitted {
		t.Errorf("joining a running download: err %v, admit asked %v", err, admitted)
	}
	r2.Close()
	refuse := errors.New("quarantined")
	if _, err := g.Join(context.Background(), h.job("nar-5", e, src, 1), func() error { return refuse }); !errors.Is(err, refuse) || g.Running("nar-5") {
		t.Errorf("refused admission: %v, running %v", err, g.Running("nar-5"))
	}
	// Close cancels the download; the reader fails, nothing is committed.
	g.Close()
	if _, err := io.Copy(io.Discard, r); err == nil {
		t.Error("reader of a cancelled download ended cleanly")
	}
	r.Close()
	if _, err := g.Join(context.Background(), h.job("nar-6", e, src, 1), nil); !errors.Is(err, ErrClosed) {
		t.Errorf("join after Close: %v", err)
	}
	if h.committed.Load() != 0 {
		t.Error("a cancelled download was committed")
	}
}

// When the cache has no room, a download nobody reads any more stops; one
// that a client still reads goes on to the end.
func TestNoRoomStopsOnlyUnreadDownloads(t *testing.T) {
	data, e := payload(600 << 10)
	noRoom := errors.New("no room")
	for _, keepReader := range []bool{true, false} {
		src := newSource(data, 0)
		h := newHarness(t)
		g := NewGroup()
		job := h.job("nar-room", e, src, int64(len(data)))
		job.Grow = func(*os.File, int64) error { return noRoom }
		r, err := g.Join(context.Background(), job, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !keepReader {
			r.Close()
		}
		src.release(len(data))
		if keepReader {
			got, err := io.ReadAll(r)
			r.Close()
			if err != nil || !bytes.Equal(got, data) {
				t.Errorf("a read download without room: %d bytes, %v", len(got), err)
			}
		}
		err = <-h.doneErr
		switch {
		case keepReader && err != nil:
			t.Errorf("read download ended with %v", err)
		case !keepReader && !errors.Is(err, noRoom):
			t.Errorf("unread download without room ended with %v, want the Grow error", err)
		}
		g.Close()
	}
}

// recodeJob adds a gzip Recode to a harness job; commits of the recoded
// file are reported on recoded.
func (h *harness) recodeJob(job Job, recoded chan<- recodedFile) Job {
	job.Recode = &Recode{
		Encoder: func(w io.Writer) io.WriteCloser { return gzip.NewWriter(w) },
		Temp:    func() (*os.File, error) { return os.CreateTemp(h.dir, job.Name+".recoded.*") },
		Commit: func(f *os.File, sum narinfo.SHA256, size int64) error {
			b, err := os.ReadFile(f.Name())
			recoded <- recodedFile{b, sum, size}
			f.Close()
			return err
		},
		Discard: func(f *os.File) { h.discarded.Add(1); f.Close(); os.Remove(f.Name()) },
	}
	return job
}

type recodedFile struct {
	data []byte
	sum  narinfo.SHA256
	size int64
}

// A recoding download serves the upstream's bytes and the recoded file to
// their readers from one transfer, and commits the recoded file with its
// hash and size.
func TestRecode(t *testing.T) {
	data, e := payload(400 << 10)
	src := newSource(data, len(data))
	h := newHarness(t)
	g := NewGroup()
	defer g.Close()
	recoded := make(chan recodedFile, 1)
	job := h.recodeJob(h.job("nar-r", e, src, int64(len(data))), recoded)
	rz, err := g.JoinRecoded(context.Background(), job, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rz.Close()
	ru, err := g.Join(context.Background(), job, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ru.Close()
	var gotZ, gotU bytes.Buffer
	if _, err := io.Copy(&gotZ, rz); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(&gotU, ru); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(gotU.Bytes(), data) {
		t.Fatal("the upstream's bytes differ")
	}
	zr, err := gzip.NewReader(bytes.NewReader(gotZ.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if nar, err := io.ReadAll(zr); err != nil || !bytes.Equal(nar, data) {
		t.Fatalf("recoded file decodes to %d bytes (%v), not the NAR", len(nar), err)
	}
	f := <-recoded
	if !bytes.Equal(f.data, gotZ.Bytes()) || f.sum != narinfo.SumSHA256(f.data) || f.size != int64(len(f.data)) {
		t.Fatalf("committed %d bytes as %d bytes with hash %s; readers got %d", len(f.data), f.size, f.sum, gotZ.Len())
	}
	if err := <-h.doneErr; err != nil || src.opens.Load() != 1 {
		t.Fatalf("done %v, %d upstream opens", err, src.opens.Load())
	}
}

// A recoding download of a NAR that disagrees fails the readers of the
// recoded file with the verification error and commits nothing; one
// without Temp has readers of the recoded file only.
func TestRecodeMismatchAndNoTemp(t *testing.T) {
	data, e := payload(600 << 10)
	bad := bytes.Clone(data)
	bad[len(bad)-1] ^= 1
	h := newHarness(t)
	g := NewGroup()
	defer g.Close()
	recoded := make(chan recodedFile, 1)
	job := h.recodeJob(h.job("nar-m", e, newSource(bad, len(bad)), int64(len(bad))), recoded)
	job.Temp = nil
	rz, err := g.JoinRecoded(context.Background(), job, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rz.Close()
	if _, err := g.Join(context.Background(), job, nil); !errors.Is(err, ErrOtherVariant) {
		t.Errorf("Join of the upstream's bytes of a download without Temp: %v, want ErrOtherVariant", err)
	}
	_, err = io.Copy(io.Discard, rz)
	var ve *verify.Error
	if !errors.As(err, &ve) || ve.Check != verify.CheckNarHash {
		t.Fatalf("reader of the recoded file got %v, want a nar_hash *verify.Error", err)
	}
	if err := <-h.doneErr; !errors.As(err, &ve) || len(recoded) != 0 || h.discarded.Load() != 1 {
		t.Fatalf("done %v, %d recoded commits, %d discards", err, len(recoded), h.discarded.Load())
	}
}

type brokenEncoder struct{}

func (brokenEncoder) Write([]byte) (int, error) { return 0, errors.New("disk on fire") }
func (brokenEncoder) Close() error              { return nil }

// A recoder that fails fails the download, but not as a verification
// failure: nothing is evidence against the NAR.
func TestRecodeFailureIsNoMismatch(t *testing.T) {
	data, e := payload(300 << 10)
	h := newHarness(t)
	g := NewGroup()
	defer g.Close()
	job := h.recodeJob(h.job("nar-f", e, newSource(data, len(data)), int64(len(data))), make(chan recodedFile, 1))
	job.Recode.Encoder = func(io.Writer) io.WriteCloser { return brokenEncoder{} }
	r, err := g.Join(context.Background(), job, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, err = io.Copy(io.Discard, r)
	var ve *verify.Error
	if err == nil || errors.As(err, &ve) {
		t.Fatalf("reader got %v, want a failure that is no *verify.Error", err)
	}
	if err := <-h.doneErr; err == nil || errors.As(err, &ve) || h.committed.Load() != 0 {
		t.Fatalf("done %v, committed %d", err, h.committed.Load())
	}
}

type identityEncoder struct{ w io.Writer }

func (e identityEncoder) Write(p []byte) (int, error) { return e.w.Write(p) }
func (identityEncoder) Close() error                  { return nil }

// Readers of the recoded file are held back like those of the upstream's
// bytes: nobody gets its last Holdback bytes before the NAR verified.
func TestRecodedHoldBack(t *testing.T) {
	data, e := payload(1 << 20)
	src := newSource(data, len(data)-1) // withhold the last byte
	h := newHarness(t)
	g := NewGroup()
	defer g.Close()
	job := h.recodeJob(h.job("nar-h", e, src, int64(len(data))), make(chan recodedFile, 1))
	job.Recode.Encoder = func(w io.Writer) io.WriteCloser { return identityEncoder{w} }
	ctx, cancel := context.WithCancel(context.Background())
	r, err := g.JoinRecoded(ctx, job, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	rest, err := g.JoinRecoded(context.Background(), job, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rest.Close()
	want := int64(len(data) - 1 - Holdback)
	p := make([]byte, 4096)
	for r.Offset() < want {
		if _, err := r.Read(p); err != nil {
			t.Fatalf("after %d bytes: %v", r.Offset(), err)
		}
	}
	// Nothing more comes while the upstream withholds its last byte.
	time.AfterFunc(20*time.Millisecond, cancel)
	if n, err := r.Read(p); n != 0 || !errors.Is(err, context.Canceled) || r.Offset() != want {
		t.Fatalf("read %d more bytes (%v) after %d of %d, want exactly %d before the end", n, err, r.Offset(), len(data), want)
	}
	src.release(len(data))
	if n, err := io.Copy(io.Discard, rest); err != nil || n != int64(len(data)) {
		t.Fatalf("reader got %d bytes, %v; want %d", n, err, len(data))
	}
}

// Decoders share a memory budget: a download whose decoder does not fit
// waits, before it opens its upstream, until one that runs ends; one that
// needs nothing of it never waits.
func TestDecodingBudget(t *testing.T) {
	g := NewGroup()
	defer g.Close()
	// Here the weight is the NAR's size, for payloads of no compression.
	g.LimitDecoding(100<<10, func(e verify.Expect) int64 {
		if e.NarSize < 1000 {
			return 0
		}
		return int64(e.NarSize)
	})
	bigA, eA := payload(80 << 10)
	bigB, eB := payload(81 << 10)
	small, eS := payload(500)
	srcA := newSource(bigA, 1) // held after one byte
	srcB := newSource(bigB, len(bigB))
	srcS := newSource(small, len(small))
	hA, hB, hS := newHarness(t), newHarness(t), newHarness(t)
	rA, err := g.Join(context.Background(), hA.job("a", eA, srcA, int64(len(bigA))), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rA.Close()
	for srcA.opens.Load() == 0 {
		runtime.Gosched()
	}
	rB, err := g.Join(context.Background(), hB.job("b", eB, srcB, int64(len(bigB))), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rB.Close()
	// The small one goes through while A holds the budget and B waits.
	rS, err := g.Join(context.Background(), hS.job("s", eS, srcS, int64(len(small))), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(rS); err != nil || !bytes.Equal(got, small) {
		t.Fatalf("small download: %d bytes, %v", len(got), err)
	}
	rS.Close()
	if n := srcB.opens.Load(); n != 0 {
		t.Fatalf("B opened its upstream while A held the budget (%d)", n)
	}
	srcA.release(len(bigA))
	if got, err := io.ReadAll(rA); err != nil || !bytes.Equal(got, bigA) {
		t.Fatalf("A: %d bytes, %v", len(got), err)
	}
	if got, err := io.ReadAll(rB); err != nil || !bytes.Equal(got, bigB) {
		t.Fatalf("B after A: %d bytes, %v", len(got), err)
	}
}
