package sdnotify

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// listen opens a real unixgram socket the way systemd does and returns it
// with the $NOTIFY_SOCKET value that names it.
func listen(t *testing.T, abstract bool) (*net.UnixConn, string) {
	t.Helper()
	name := filepath.Join(t.TempDir(), "notify")
	if abstract {
		name = "@cacheproxy-sdnotify-test-" + strconv.Itoa(os.Getpid()) + "-" + t.Name()
	}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, name
}

func receive(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

func TestNotify(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		t.Run("abstract="+strconv.FormatBool(abstract), func(t *testing.T) {
			c, socket := listen(t, abstract)
			n, err := New(socket)
			if err != nil {
				t.Fatal(err)
			}
			steps := []struct {
				send func() error
				want string
			}{
				{func() error { return n.Ready("serving") }, "READY=1\nSTATUS=serving\n"},
				{func() error { return n.Reloading("reloading\nconfig") }, "RELOADING=1\nSTATUS=reloading config\n"},
				{func() error { return n.Ready("reloaded") }, "READY=1\nSTATUS=reloaded\n"},
				{func() error { return n.SetStatus("draining 2") }, "STATUS=draining 2\n"},
				{func() error { return n.Stopping("stopping") }, "STOPPING=1\nSTATUS=stopping\n"},
			}
			for _, s := range steps {
				if err := s.send(); err != nil {
					t.Fatal(err)
				}
				if got := receive(t, c); got != s.want {
					t.Fatalf("datagram %q, want %q", got, s.want)
				}
			}
		})
	}
}

func TestWithoutSocket(t *testing.T) {
	n, err := New("")
	if err != nil {
		t.Fatal(err)
	}
	if n.Enabled() {
		t.Fatal("enabled without a socket")
	}
	if err := n.Ready("x"); err != nil {
		t.Fatal(err)
	}
	var nilN *Notifier
	if err := nilN.Stopping("x"); err != nil {
		t.Fatal(err)
	}
}

func TestBadSocket(t *testing.T) {
	if _, err := New("relative/path"); err == nil {
		t.Fatal("a relative socket path was accepted")
	}
	n, err := New(filepath.Join(t.TempDir(), "nobody-listens"))
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Ready("x"); err == nil {
		t.Fatal("no error for a socket nobody listens on")
	}
}
