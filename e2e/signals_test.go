package e2e

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// notifySocket is a unixgram socket standing in for systemd's: the proxy
// started while it is set in $NOTIFY_SOCKET reports its state changes to it.
type notifySocket struct {
	conn *net.UnixConn
}

// listenNotify sets $NOTIFY_SOCKET for the processes the test starts (so
// the test must not be parallel).
func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	name := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", name)
	return &notifySocket{conn: c}
}

// expect reads the next datagram and checks that it carries every line in
// want (a hang guard of 30 s, not a timing assertion).
func (n *notifySocket) expect(t *testing.T, want ...string) string {
	t.Helper()
	n.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 4096)
	k, err := n.conn.Read(buf)
	if err != nil {
		t.Fatalf("no notification (want %q): %v", want, err)
	}
	msg := string(buf[:k])
	for _, w := range want {
		if !strings.Contains("\n"+msg, "\n"+w) {
			t.Fatalf("notification %q, want a line %q", msg, w)
		}
	}
	return msg
}

func (p *Proxy) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// waitExit waits for the server to exit and returns its exit code.
func (p *Proxy) waitExit(t *testing.T) int {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("cacheproxy did not exit within 60s\nlog:\n%s", p.Logs())
	}
	return p.cmd.ProcessState.ExitCode()
}

// SIGHUP reloads the configuration in the running process: a lower quorum
// approves a path that was refused, a broken file is refused and the old
// configuration keeps serving, a changed listen address is logged as
// needing a restart, and a stored decision is decided again from its
// stored narinfo. systemd hears READY, RELOADING/READY and STOPPING.
func TestSIGHUPReloadsConfig(t *testing.T) {
	notify := listenNotify(t)
	cfg := ProxyConfig{Attesters: []*Key{rb1Key, rb2Key}, Quorum: 2}
	f := newFixture(t, "none", cfg, nil)
	cfg.Upstreams = []UpstreamSpec{f.Up.Spec()}
	px := f.Px
	notify.expect(t, "READY=1", "STATUS=serving on "+px.Addr)
	pid := px.cmd.Process.Pid

	f.attestClosure(t) // rebuilder-1 only: short of the quorum of 2
	px.ExpectRejected(t, f.C.App, "unattested")

	rewrite := func(listen string, cfg ProxyConfig) {
		writeConfig(t, px.Dir, listen, px.AdminAddr, px.StateDir, cfg)
	}
	reload := func(wantStatus string) {
		t.Helper()
		px.signal(t, syscall.SIGHUP)
		notify.expect(t, "RELOADING=1")
		notify.expect(t, "READY=1", "STATUS=serving on "+px.Addr+"; "+wantStatus)
	}

	// A quorum of 1: the remembered rejection is forgotten at once.
	cfg.Quorum = 1
	rewrite(px.Addr, cfg)
	reload("configuration reloaded")
	px.ExpectApproved(t, f.C.App)

	// A broken file: refused, logged with its key, the old one serves on.
	if err := os.WriteFile(px.CfgFile, []byte("listen = \""+px.Addr+"\"\n[policy]\nquorum = 3\nattesters = []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	reload("last reload refused (see the log)")
	if !px.LogsContain("reload refused", "policy.quorum") {
		t.Errorf("the refused reload is not logged with the offending key:\n%s", px.Logs())
	}
	px.ExpectApproved(t, f.C.App)
	if err := os.WriteFile(px.CfgFile, []byte("this is not = = TOML"), 0o644); err != nil {
		t.Fatal(err)
	}
	reload("last reload refused (see the log)")
	px.ExpectApproved(t, f.C.App)

	// Back to a quorum of 2 with another listen address: the address needs
	// a restart and keeps serving where it was; the approval is decided
	// again from the stored narinfo, without asking the upstream.
	cfg.Quorum = 2
	rewrite(freeAddr(t), cfg)
	before := f.Up.NarinfoCount(f.C.App)
	reload("reloaded, restart needed for listen")
	px.ExpectRejected(t, f.C.App, "unattested")
	if n := f.Up.NarinfoCount(f.C.App) - before; n != 0 {
		t.Errorf("%d upstream narinfo requests after the reload, want 0 (decided from the stored narinfo)", n)
	}
	if !px.LogsContain("key=listen") {
		t.Errorf("the listen change is not logged as needing a restart:\n%s", px.Logs())
	}
	if px.cmd.Process.Pid != pid {
		t.Fatal("the process was restarted")
	}

	px.signal(t, syscall.SIGTERM)
	notify.expect(t, "STOPPING=1")
	if code := px.waitExit(t); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0\n%s", code, px.Logs())
	}
}

// stalledNAR starts a proxy whose upstream sends half of an approved NAR
// and stalls until release is called; it returns the proxy, the client's
// response after 1 MiB of the body arrived, the bytes read so far and the
// FileHash of the whole NAR.
func stalledNAR(t *testing.T, top string) (px *Proxy, resp *http.Response, head []byte, fileHash string, release func()) {
	t.Helper()
	c := buildClosure(t, ClosureOpts{BigSize: 4 << 20})
	up := newUpstream(t, upKey)
	up.Publish(t, "none", c.App)
	px = startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}, Top: top})
	px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
	ni := px.ExpectApproved(t, c.App)
	release = up.StallHalfway(t, c.App)
	resp, err := httpClient.Get(px.URL + narPath(ni))
	if err != nil {
		t.Fatalf("GET NAR: %v", err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 {
		t.Fatalf("GET NAR: status %d", resp.StatusCode)
	}
	var buf bytes.Buffer
	if _, err := io.CopyN(&buf, resp.Body, 1<<20); err != nil {
		t.Fatalf("reading the first MiB: %v", err)
	}
	return px, resp, buf.Bytes(), ni.Get("FileHash"), release
}

// SIGTERM stops accepting connections but lets a NAR download in flight
// finish, then exits 0.
func TestSIGTERMDrainsInFlightNAR(t *testing.T) {
	t.Parallel()
	px, resp, head, fileHash, release := stalledNAR(t, "")
	px.signal(t, syscall.SIGTERM)
	eventually(t, 20*time.Second, func() error {
		c, err := net.Dial("tcp", px.Addr)
		if err != nil {
			return nil
		}
		c.Close()
		return errors.New("the main listener still accepts connections after SIGTERM")
	})
	select {
	case <-px.exited:
		t.Fatalf("cacheproxy exited with a NAR in flight\n%s", px.Logs())
	default:
	}
	release()
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("the NAR in flight was cut off: %v\n%s", err, px.Logs())
	}
	if got := sha256Nix32(append(head, rest...)); got != fileHash {
		t.Errorf("drained NAR (%d bytes) does not match FileHash", len(head)+len(rest))
	}
	if code := px.waitExit(t); code != 0 {
		t.Fatalf("exit code %d after draining, want 0\n%s", code, px.Logs())
	}
	if !px.LogsContain("draining") {
		t.Errorf("no log line says the server drains:\n%s", px.Logs())
	}
}

// Past shutdown_timeout a response still in flight is cut off (the client
// sees a broken body, never a short one passed as whole) and the process
// still exits 0.
func TestSIGTERMShutdownTimeout(t *testing.T) {
	t.Parallel()
	px, resp, _, _, _ := stalledNAR(t, "shutdown_timeout = \"1s\"\n")
	px.signal(t, syscall.SIGTERM)
	if code := px.waitExit(t); code != 0 {
		t.Fatalf("exit code %d, want 0\n%s", code, px.Logs())
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("the NAR cut off at shutdown_timeout read as complete")
	}
	if !px.LogsContain("shutdown_timeout reached") {
		t.Errorf("the cut-off is not logged:\n%s", px.Logs())
	}
}
