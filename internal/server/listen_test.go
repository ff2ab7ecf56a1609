package server

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// serveLimited runs the fixture's server on real listeners with lim.
func serveLimited(t *testing.T, f *fixture, lim Limits) (mainAddr string) {
	t.Helper()
	main, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.s.Limits = lim
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.s.Serve(ctx, main, nil) }()
	t.Cleanup(func() { cancel(); <-done })
	return main.Addr().String()
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedWithin reports whether the server closes c within d.
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	return err == nil // EOF: closed by the server; a timeout is an error
}

// A client cannot hold a connection by saying nothing, by sending headers
// slowly, or by idling on a keep-alive connection.
func TestConnectionTimeouts(t *testing.T) {
	f := newFixture(t)
	lim := DefaultLimits()
	lim.ReadHeader, lim.Idle, lim.ReadBody = 200*time.Millisecond, 300*time.Millisecond, time.Second
	addr := serveLimited(t, f, lim)

	silent := dial(t, addr)
	if !closedWithin(silent, 3*time.Second) {
		t.Error("a connection that never sent a request was not closed")
	}
	slow := dial(t, addr)
	fmt.Fprintf(slow, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n")
	time.Sleep(100 * time.Millisecond)
	fmt.Fprintf(slow, "X-Slow: 1\r\n") // never finishes the headers
	if !closedWithin(slow, 3*time.Second) {
		t.Error("slowloris headers kept the connection")
	}
	idle := dial(t, addr)
	fmt.Fprintf(idle, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(idle), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("first request: %v %v", resp, err)
	}
	resp.Body.Close()
	if !closedWithin(idle, 3*time.Second) {
		t.Error("an idle keep-alive connection was not closed")
	}
}

// At the connection cap, /healthz still answers (and says 200), other
// requests get 503 with Retry-After, and freed slots serve again.
func TestConnectionCap(t *testing.T) {
	f := newFixture(t)
	lim := DefaultLimits()
	lim.MaxConns, lim.Headroom = 4, 2
	addr := serveLimited(t, f, lim)

	var held []net.Conn
	for range lim.MaxConns {
		c := dial(t, addr)
		fmt.Fprintf(c, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("within the cap: %v %v", resp, err)
		}
		resp.Body.Close()
		held = append(held, c) // kept alive
	}
	get := func(path string) (int, string) {
		c := dial(t, addr)
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("GET %s over the cap: %v", path, err)
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Retry-After")
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz at the cap: %d, want 200", code)
	}
	if code, ra := get("/nix-cache-info"); code != 503 || ra == "" {
		t.Errorf("a request over the cap: %d (Retry-After %q), want 503 with Retry-After", code, ra)
	}
	for _, c := range held {
		c.Close()
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		code, _ := get("/nix-cache-info")
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("freed connections were not reused: %d", code)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readFromSpy is a real TCP connection that notes whether a body was
// handed to its ReadFrom (for *net.TCPConn, sendfile).
type readFromSpy struct {
	*net.TCPConn
	used chan int64
}

func (c *readFromSpy) ReadFrom(r io.Reader) (int64, error) {
	n, err := c.TCPConn.ReadFrom(r)
	c.used <- n
	return n, err
}

type spyListener struct {
	net.Listener
	used chan int64
}

func (l spyListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &readFromSpy{TCPConn: c.(*net.TCPConn), used: l.used}, nil
}

// The connection cap must not cost cached NARs their sendfile: net/http
// only uses it when the connection itself is an io.ReaderFrom.
func TestConnectionCapKeepsSendfile(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	used := make(chan int64, 1)
	body := bytes.Repeat([]byte("nar "), 64<<10)
	file := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(file, body, 0o644); err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(served)
		http.ServeFile(w, r, file)
	})}
	go srv.Serve(newLimitListener(spyListener{Listener: inner, used: used}, 4, 1))
	t.Cleanup(func() { srv.Close() })

	resp, err := http.Get("http://" + inner.Addr().String() + "/blob")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("body: %d bytes, %v", len(got), err)
	}
	<-served // the handler has returned, and with it any ReadFrom
	select {
	case n := <-used:
		// net/http writes the first 512 bytes itself (content sniffing).
		if n < int64(len(body))-512 {
			t.Fatalf("the connection's ReadFrom sent %d of %d bytes", n, len(body))
		}
	default:
		t.Fatal("the file went out without the connection's ReadFrom (no sendfile)")
	}
}
