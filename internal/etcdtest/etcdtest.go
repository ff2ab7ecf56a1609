// Package etcdtest starts a real etcd cluster on loopback for tests, from
// Debian's etcd binary (package etcd-server). It is imported only by tests:
// cluster mode must be proven against the real server, including members
// dying and coming back, which an in-memory fake cannot show.
//
// Members bootstrap statically (--initial-cluster) on free loopback ports,
// with data directories under t.TempDir() and election timings short
// enough for tests. Each member's log goes to a file that is printed when
// the test fails. Every method that takes no testing.TB reports through
// the testing.TB given to Start, so call them from the test's goroutine.
package etcdtest

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/testcert"
)

// Binary is the etcd server the package runs.
const Binary = "/usr/bin/etcd"

const installHint = "apt-get install -y etcd-server"

// Timings. The election timeout is ten heartbeats, as etcd recommends, and
// short so a killed leader is replaced within about a second.
const (
	heartbeatMS       = 50
	electionTimeoutMS = 500
	// healthyTimeout bounds a wait for health; it is a guard against a
	// hung test, not an assertion, so it is generous for a loaded machine.
	healthyTimeout = 60 * time.Second
	startAttempts  = 5
)

// Options configures a cluster.
type Options struct {
	// Members is the number of members; 0 means 1.
	Members int
	// TLS serves the client URLs over HTTPS and requires client
	// certificates signed by the cluster's test CA (--client-cert-auth).
	// Peer traffic stays plain HTTP on loopback.
	TLS bool
}

// TLSFiles are PEM files for a client of a TLS cluster: the CA that signed
// the members' certificates, and a client certificate and key it trusts.
type TLSFiles struct {
	CAFile, CertFile, KeyFile string
}

// Cluster is a running etcd cluster.
type Cluster struct {
	t       testing.TB
	dir     string
	token   string
	tls     *TLSFiles
	server  testcert.Pair // the members' certificate, when TLS
	http    *http.Client  // health checks
	members []*member
}

type member struct {
	name      string
	clientURL string
	peerURL   string
	dataDir   string
	logPath   string
	logStart  int64 // size of the log when the current run started
	cmd       *exec.Cmd
	done      chan struct{} // closed when the process has exited
	waitErr   error         // valid after done
}

// errPortTaken means a member could not bind a port chosen as free: another
// process took it between the probe and etcd's bind.
var errPortTaken = errors.New("port taken between probe and bind")

// Start starts a cluster of members members (1 or 3 in practice) and
// waits until every member reports healthy. The cluster is killed when the
// test ends.
func Start(t testing.TB, members int) *Cluster {
	t.Helper()
	return StartWith(t, Options{Members: members})
}

// StartWith starts a cluster configured by opts; see Start.
func StartWith(t testing.TB, opts Options) *Cluster {
	t.Helper()
	return start(t, opts, nil)
}

// start is StartWith with a hook that sees the ports of each boot attempt
// before etcd binds them, so a test can steal one.
func start(t testing.TB, opts Options, portsHook func(attempt int, ports []int)) *Cluster {
	t.Helper()
	requireBinary(t, Binary)
	n := opts.Members
	if n == 0 {
		n = 1
	}
	if n < 0 {
		t.Fatalf("etcdtest: %d members", n)
	}
	c := &Cluster{t: t, dir: t.TempDir(), token: "etcdtest-" + randomHex(t)}
	c.http = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if opts.TLS {
		ca := testcert.NewCA(t, "etcdtest-ca")
		c.server = ca.Issue(t, "etcd-server", "127.0.0.1", "localhost")
		client := ca.Issue(t, "etcd-client")
		c.tls = &TLSFiles{CAFile: ca.CertFile, CertFile: client.CertFile, KeyFile: client.KeyFile}
		c.http.Transport = &http.Transport{DisableKeepAlives: true, TLSClientConfig: c.ClientTLSConfig()}
	}
	for i := range n {
		name := "m" + strconv.Itoa(i)
		c.members = append(c.members, &member{
			name:    name,
			dataDir: filepath.Join(c.dir, name+".etcd"),
			logPath: filepath.Join(c.dir, name+".log"),
		})
	}
	// Registered after t.TempDir, so it runs before the directory is
	// removed: etcd must be dead before its data dir goes.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("etcdtest: member logs (tail):\n%s", c.logTails())
		}
		c.Stop()
	})

	for attempt := 1; ; attempt++ {
		err := c.boot(func(ports []int) {
			if portsHook != nil {
				portsHook(attempt, ports)
			}
		})
		if err == nil {
			return c
		}
		c.Stop()
		if errors.Is(err, errPortTaken) && attempt < startAttempts {
			t.Logf("etcdtest: attempt %d: %v; retrying on other ports", attempt, err)
			for _, m := range c.members {
				if rerr := os.RemoveAll(m.dataDir); rerr != nil {
					t.Fatalf("etcdtest: removing %s for a retry: %v", m.dataDir, rerr)
				}
			}
			continue
		}
		t.Fatalf("etcdtest: starting %d-member cluster: %v\nmember logs (tail):\n%s", n, err, c.logTails())
	}
}

// requireBinary skips the test when etcd is not installed, or fails it when
// CI is set, as the e2e harness does for a missing Nix client: CI must not
// pass by skipping.
func requireBinary(t testing.TB, path string) {
	t.Helper()
	if _, err := os.Stat(path); err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("etcdtest: %s is missing (CI is set, refusing to skip); install it with: %s", path, installHint)
	}
	t.Skipf("etcdtest: %s is missing; install it with: %s", path, installHint)
}

// boot picks fresh ports for every member, starts them all as a new
// cluster and waits until all are healthy.
func (c *Cluster) boot(hook func(ports []int)) error {
	ports, err := freePorts(2 * len(c.members))
	if err != nil {
		return err
	}
	hook(ports)
	scheme := "http"
	if c.tls != nil {
		scheme = "https"
	}
	var initial []string
	for i, m := range c.members {
		m.clientURL = fmt.Sprintf("%s://127.0.0.1:%d", scheme, ports[2*i])
		m.peerURL = fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1])
		initial = append(initial, m.name+"="+m.peerURL)
	}
	for _, m := range c.members {
		if err := c.spawn(m, strings.Join(initial, ","), "new"); err != nil {
			return err
		}
	}
	return c.waitHealthy(c.members)
}

// freePorts returns n distinct loopback ports that were free a moment ago.
// All listeners are open at once so the ports differ; a port may still be
// taken before etcd binds it, which boot's caller retries.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("probing for a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func (c *Cluster) spawn(m *member, initialCluster, state string) error {
	args := []string{
		"--name", m.name,
		"--data-dir", m.dataDir,
		"--listen-client-urls", m.clientURL,
		"--advertise-client-urls", m.clientURL,
		"--listen-peer-urls", m.peerURL,
		"--initial-advertise-peer-urls", m.peerURL,
		"--initial-cluster", initialCluster,
		"--initial-cluster-state", state,
		"--initial-cluster-token", c.token,
		"--heartbeat-interval", strconv.Itoa(heartbeatMS),
		"--election-timeout", strconv.Itoa(electionTimeoutMS),
		// A restarted member must not depose a working leader by
		// campaigning with a higher term.
		"--pre-vote",
		"--logger", "zap",
		"--log-outputs", "stderr",
	}
	if c.tls != nil {
		args = append(args,
			"--cert-file", c.server.CertFile,
			"--key-file", c.server.KeyFile,
			"--trusted-ca-file", c.tls.CAFile,
			"--client-cert-auth")
	}
	logf, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("member %s: opening log: %w", m.name, err)
	}
	if fi, err := logf.Stat(); err == nil {
		m.logStart = fi.Size()
	}
	fmt.Fprintf(logf, "=== etcdtest: %s %s\n", Binary, strings.Join(args, " "))
	cmd := exec.Command(Binary, args...)
	cmd.Env = etcdFreeEnv()
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Die with the test binary, so a crashed test leaves no etcd behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("member %s: starting %s: %w", m.name, Binary, err)
	}
	m.cmd = cmd
	m.done = make(chan struct{})
	go func(done chan struct{}) {
		m.waitErr = cmd.Wait()
		logf.Close()
		close(done)
	}(m.done)
	return nil
}

// etcdFreeEnv is the test's environment without ETCD_* variables, which
// etcd reads as flags and which would conflict with ours.
func etcdFreeEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD_") {
			env = append(env, kv)
		}
	}
	return env
}

func (m *member) running() bool {
	if m.done == nil {
		return false
	}
	select {
	case <-m.done:
		return false
	default:
		return true
	}
}

// waitHealthy polls /health on each of ms until all report healthy, or
// fails early when one of them exits.
func (c *Cluster) waitHealthy(ms []*member) error {
	deadline := time.Now().Add(healthyTimeout)
	for _, m := range ms {
		for {
			if !m.running() {
				return m.exitError()
			}
			err := c.health(m)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("member %s not healthy after %v: %w", m.name, healthyTimeout, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

func (m *member) exitError() error {
	if m.done == nil {
		return fmt.Errorf("member %s is not running", m.name)
	}
	<-m.done
	if bytes.Contains(m.runLog(), []byte("address already in use")) {
		return fmt.Errorf("member %s exited (%v): %w", m.name, m.waitErr, errPortTaken)
	}
	return fmt.Errorf("member %s exited: %v", m.name, m.waitErr)
}

// runLog returns the log of the member's current (or last) run.
func (m *member) runLog() []byte {
	f, err := os.Open(m.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	b, _ := io.ReadAll(io.NewSectionReader(f, m.logStart, 1<<40))
	return b
}

// health asks a member's /health, which is true only when the member has a
// leader and a quorum read through it succeeds.
func (c *Cluster) health(m *member) error {
	resp, err := c.http.Get(m.clientURL + "/health")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return fmt.Errorf("reading /health: %w", err)
	}
	var h struct {
		Health string `json:"health"`
	}
	if err := json.Unmarshal(body, &h); err != nil {
		return fmt.Errorf("/health: HTTP %d, %q: %w", resp.StatusCode, body, err)
	}
	if resp.StatusCode != http.StatusOK || h.Health != "true" {
		return fmt.Errorf("/health: HTTP %d, %s", resp.StatusCode, bytes.TrimSpace(body))
	}
	return nil
}

// Endpoints returns every member's client URL, killed members included
// (a client is configured with all of them, as in production).
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.clientURL)
	}
	return eps
}

// Endpoint returns member i's client URL.
func (c *Cluster) Endpoint(i int) string { return c.member(i).clientURL }

// Members returns the number of members, running or not.
func (c *Cluster) Members() int { return len(c.members) }

// TLS returns the files a client needs to reach a TLS cluster, or nil when
// the cluster serves plain HTTP.
func (c *Cluster) TLS() *TLSFiles {
	if c.tls == nil {
		return nil
	}
	f := *c.tls
	return &f
}

// ClientTLSConfig returns a TLS configuration for a client of a TLS cluster
// (trusting its CA and presenting its client certificate), or nil when the
// cluster serves plain HTTP.
func (c *Cluster) ClientTLSConfig() *tls.Config {
	c.t.Helper()
	if c.tls == nil {
		return nil
	}
	caPEM, err := os.ReadFile(c.tls.CAFile)
	if err != nil {
		c.t.Fatalf("etcdtest: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		c.t.Fatalf("etcdtest: no certificate in %s", c.tls.CAFile)
	}
	cert, err := tls.LoadX509KeyPair(c.tls.CertFile, c.tls.KeyFile)
	if err != nil {
		c.t.Fatalf("etcdtest: loading client certificate: %v", err)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
}

func (c *Cluster) member(i int) *member {
	c.t.Helper()
	if i < 0 || i >= len(c.members) {
		c.t.Fatalf("etcdtest: no member %d in a %d-member cluster", i, len(c.members))
	}
	return c.members[i]
}

// Kill kills member i with SIGKILL, as a crash would, and waits until it
// has exited. Killing a member that is not running does nothing.
func (c *Cluster) Kill(i int) {
	c.t.Helper()
	c.member(i).kill()
}

func (m *member) kill() {
	if m.done == nil {
		return
	}
	// The error is "process already finished" when it died on its own;
	// either way it is gone after done.
	_ = m.cmd.Process.Kill()
	<-m.done
}

// Restart starts a killed member i again on its data directory, ports and
// name (--initial-cluster-state existing), and waits until it reports
// healthy, which needs a quorum of running members. Its ports cannot
// change (the peer URL is in the cluster's membership), so when another
// process has taken one meanwhile, Restart retries until it is free.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	m := c.member(i)
	if m.running() {
		c.t.Fatalf("etcdtest: Restart(%d): member %s is running; Kill it first", i, m.name)
	}
	var initial []string
	for _, o := range c.members {
		initial = append(initial, o.name+"="+o.peerURL)
	}
	deadline := time.Now().Add(healthyTimeout)
	for {
		if err := c.spawn(m, strings.Join(initial, ","), "existing"); err != nil {
			c.t.Fatalf("etcdtest: Restart(%d): %v", i, err)
		}
		err := c.waitHealthy([]*member{m})
		if err == nil {
			return
		}
		m.kill()
		if errors.Is(err, errPortTaken) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		c.t.Fatalf("etcdtest: Restart(%d): %v\nmember logs (tail):\n%s", i, err, c.logTails())
	}
}

// WaitHealthy waits until every running member reports healthy: after a
// Kill, until the survivors have elected a leader (when they are a quorum).
func (c *Cluster) WaitHealthy() {
	c.t.Helper()
	var running []*member
	for _, m := range c.members {
		if m.running() {
			running = append(running, m)
		}
	}
	if err := c.waitHealthy(running); err != nil {
		c.t.Fatalf("etcdtest: %v\nmember logs (tail):\n%s", err, c.logTails())
	}
}

// Healthy reports whether member i answers /health with {"health":"true"},
// and why not.
func (c *Cluster) Healthy(i int) error {
	c.t.Helper()
	m := c.member(i)
	if !m.running() {
		return fmt.Errorf("member %s is not running", m.name)
	}
	return c.health(m)
}

// Stop kills every member and waits for them to exit. It is idempotent and
// also runs when the test ends.
func (c *Cluster) Stop() {
	for _, m := range c.members {
		m.kill()
	}
}

// Log returns member i's log so far (all its runs).
func (c *Cluster) Log(i int) string {
	c.t.Helper()
	b, err := os.ReadFile(c.member(i).logPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		c.t.Fatalf("etcdtest: %v", err)
	}
	return string(b)
}

// logTails returns the last lines of every member's log, for a failure
// message.
func (c *Cluster) logTails() string {
	const lines = 25
	var b strings.Builder
	for _, m := range c.members {
		data, err := os.ReadFile(m.logPath)
		if err != nil {
			fmt.Fprintf(&b, "--- %s: %v\n", m.name, err)
			continue
		}
		ls := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(ls) > lines {
			ls = ls[len(ls)-lines:]
		}
		fmt.Fprintf(&b, "--- %s (%s)\n%s\n", m.name, m.logPath, strings.Join(ls, "\n"))
	}
	return b.String()
}

func randomHex(t testing.TB) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}
