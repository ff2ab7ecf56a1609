package server

import (
	"bytes"
	"context"
	"encoding"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/config"
)

// flatHandler passes records on and remembers every attribute whose value
// would print as a Go value (a map, slice, struct or pointer: the
// `counts=map[stored:1]` of old) instead of a scalar an operator can grep
// and a log shipper can index. testLogger installs it on every fixture.
type flatHandler struct {
	slog.Handler
	bad *badAttrs
}

type badAttrs struct {
	mu   sync.Mutex
	list []string
}

func (h flatHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Attrs(func(a slog.Attr) bool {
		h.check(r.Message, a)
		return true
	})
	return h.Handler.Handle(ctx, r)
}

func (h flatHandler) WithAttrs(as []slog.Attr) slog.Handler {
	for _, a := range as {
		h.check("(WithAttrs)", a)
	}
	return flatHandler{h.Handler.WithAttrs(as), h.bad}
}

func (h flatHandler) WithGroup(name string) slog.Handler {
	return flatHandler{h.Handler.WithGroup(name), h.bad}
}

func (h flatHandler) check(msg string, a slog.Attr) {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		for _, g := range v.Group() {
			h.check(msg, g)
		}
		return
	}
	if v.Kind() != slog.KindAny || !printsAsGoValue(v.Any()) {
		return
	}
	h.bad.mu.Lock()
	defer h.bad.mu.Unlock()
	h.bad.list = append(h.bad.list, msg+": "+a.Key+" is a "+reflect.TypeOf(v.Any()).String())
}

func printsAsGoValue(x any) bool {
	switch x.(type) {
	case nil, error, time.Time, time.Duration, encoding.TextMarshaler:
		return false
	}
	switch reflect.TypeOf(x).Kind() {
	case reflect.Map, reflect.Slice, reflect.Array, reflect.Struct, reflect.Pointer:
		return true
	}
	return false
}

// checkFlatLogs wraps h so that the test fails, at its end, if anything
// was logged as a Go value.
func checkFlatLogs(t testing.TB, h slog.Handler) slog.Handler {
	bad := &badAttrs{}
	t.Cleanup(func() {
		bad.mu.Lock()
		defer bad.mu.Unlock()
		for _, b := range bad.list {
			t.Errorf("log attribute prints a Go value: %s", b)
		}
	})
	return flatHandler{h, bad}
}

func TestFlatHandlerCatchesMaps(t *testing.T) {
	bad := &badAttrs{}
	log := slog.New(flatHandler{slog.NewTextHandler(&bytes.Buffer{}, nil), bad})
	log.Info("ok", "n", 1, "s", "x", "err", context.Canceled, "at", time.Now(), slog.Group("g", "k", "v"))
	log.Info("bad", "counts", map[string]int{"stored": 1}, slog.Group("g", "list", []string{"a"}))
	if len(bad.list) != 2 || !strings.Contains(bad.list[0], "counts is a map[string]int") {
		t.Fatalf("flagged: %v", bad.list)
	}
}

// syncBuf is a log sink safe for the server's goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The settings message is for a restart under other settings, not for the
// first start on an empty state dir.
func TestFirstStartLogsNoSettingsChange(t *testing.T) {
	f := newFixture(t)
	f.stop()
	const msg = "decision settings changed since the last start"
	open := func() string {
		t.Helper()
		var logs syncBuf
		s, err := New(f.cfg, slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		return logs.String()
	}
	f.cfg.StateDir = t.TempDir()
	if logs := open(); strings.Contains(logs, msg) {
		t.Errorf("first start on an empty state dir:\n%s", logs)
	}
	if logs := open(); strings.Contains(logs, msg) {
		t.Errorf("second start, same settings:\n%s", logs)
	}
	f.cfg.Mode = config.ModeReport
	if logs := open(); !strings.Contains(logs, msg) {
		t.Errorf("start in report mode after enforce does not say so:\n%s", logs)
	}
}

// An upstream that does not answer is named in a warning at start, before
// any client asks; one that answers is not.
func TestStartWarnsUnreachableUpstream(t *testing.T) {
	good := newFakeUpstream(t, "good-1")
	good.handle("/nix-cache-info", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("StoreDir: /nix/store\n"))
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadURL := "http://" + l.Addr().String()
	l.Close() // nothing listens there now
	f := newFixtureWith(t, []*fakeUpstream{good})
	f.stop()
	f.cfg.Upstreams = append(f.cfg.Upstreams, config.Upstream{URL: deadURL, PublicKeys: f.cfg.Upstreams[0].PublicKeys,
		Timeout: config.Duration{Duration: 2 * time.Second}, MaxConnections: 4})
	var logs syncBuf
	s, err := New(f.cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	main, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, main, nil) }()
	const warning = "upstream does not answer /nix-cache-info at start"
	eventually(t, 10*time.Second, "the start-up warning", func() bool {
		return strings.Contains(logs.String(), warning)
	})
	cancel()
	<-done
	for _, line := range strings.Split(logs.String(), "\n") {
		if !strings.Contains(line, warning) {
			continue
		}
		if !strings.Contains(line, "upstream="+deadURL) {
			t.Errorf("warning for an upstream that answers: %s", line)
		}
	}
}
