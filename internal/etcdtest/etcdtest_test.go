package etcdtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// newClient connects the etcd client the cluster code will use (v3.7)
// to every member of c.
func newClient(t *testing.T, c *Cluster) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   c.Endpoints(),
		DialTimeout: 10 * time.Second,
		TLS:         c.ClientTLSConfig(),
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatalf("clientv3.New: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// ctx bounds one request; the bound guards against a hang, it is not an
// assertion on speed.
func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	t.Cleanup(cancel)
	return c
}

func mustPut(t *testing.T, cli *clientv3.Client, key, val string) {
	t.Helper()
	if _, err := cli.Put(ctx(t), key, val); err != nil {
		t.Fatalf("Put %s: %v", key, err)
	}
}

func mustGet(t *testing.T, cli *clientv3.Client, key, want string) {
	t.Helper()
	resp, err := cli.Get(ctx(t), key) // linearizable: goes through a quorum
	if err != nil {
		t.Fatalf("Get %s: %v", key, err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != want {
		t.Fatalf("Get %s = %v, want %q", key, resp.Kvs, want)
	}
}

func TestSingleMember(t *testing.T) {
	c := Start(t, 1)
	if n := len(c.Endpoints()); n != 1 {
		t.Fatalf("%d endpoints, want 1", n)
	}
	if !strings.HasPrefix(c.Endpoint(0), "http://127.0.0.1:") {
		t.Fatalf("endpoint %q is not a loopback http URL", c.Endpoint(0))
	}
	if c.TLS() != nil || c.ClientTLSConfig() != nil {
		t.Fatal("plain cluster reports TLS files")
	}
	cli := newClient(t, c)
	mustPut(t, cli, "k", "v1")
	mustGet(t, cli, "k", "v1")

	// A single member keeps its data across a crash.
	c.Kill(0)
	if err := c.Healthy(0); err == nil {
		t.Fatal("killed member reports healthy")
	}
	c.Restart(0)
	mustGet(t, cli, "k", "v1")
}

// TestThreeMembersSurviveOneDown is the failure the cluster tests rely on:
// with one member of three killed, the other two keep a quorum, and the
// killed member rejoins with what it missed.
func TestThreeMembersSurviveOneDown(t *testing.T) {
	c := Start(t, 3)
	if n := len(c.Endpoints()); n != 3 {
		t.Fatalf("%d endpoints, want 3", n)
	}
	for i := range 3 {
		if err := c.Healthy(i); err != nil {
			t.Fatalf("member %d: %v", i, err)
		}
	}
	cli := newClient(t, c)
	mustPut(t, cli, "before", "1")

	// Kill the leader, the harder case: the survivors must elect anew.
	st, err := cli.Status(ctx(t), c.Endpoint(0))
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	leader := -1
	for i := range 3 {
		s, err := cli.Status(ctx(t), c.Endpoint(i))
		if err != nil {
			t.Fatalf("Status %d: %v", i, err)
		}
		if s.Header.MemberId == st.Leader {
			leader = i
		}
	}
	if leader < 0 {
		t.Fatalf("leader %x is none of the members", st.Leader)
	}
	c.Kill(leader)
	if err := c.Healthy(leader); err == nil {
		t.Fatal("killed member reports healthy")
	}
	c.WaitHealthy()
	mustPut(t, cli, "during", "2")
	mustGet(t, cli, "before", "1")
	mustGet(t, cli, "during", "2")

	// Watches work through the survivors too: cluster nodes mirror etcd
	// through one.
	wctx, cancel := context.WithCancel(ctx(t))
	defer cancel()
	wch := cli.Watch(wctx, "watched")
	mustPut(t, cli, "watched", "3")
	select {
	case wr := <-wch:
		if err := wr.Err(); err != nil {
			t.Fatalf("watch: %v", err)
		}
		if len(wr.Events) != 1 || string(wr.Events[0].Kv.Value) != "3" {
			t.Fatalf("watch events %v", wr.Events)
		}
	case <-wctx.Done():
		t.Fatal("no watch event")
	}

	c.Restart(leader)
	c.WaitHealthy()
	// The restarted member has caught up: a serializable read is answered
	// from its own state, not through the leader.
	one, err := clientv3.New(clientv3.Config{
		Endpoints: []string{c.Endpoint(leader)}, DialTimeout: 10 * time.Second, Logger: zap.NewNop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	mustGet(t, one, "during", "2")
	resp, err := one.Get(ctx(t), "during", clientv3.WithSerializable())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 {
		// A just-restarted follower may still be applying; the linearizable
		// read above waited for that, so this is a real failure.
		t.Fatalf("restarted member misses %q", "during")
	}
}

// TestQuorumLost proves a test can take etcd's quorum away and give it back.
func TestQuorumLost(t *testing.T) {
	c := Start(t, 3)
	cli := newClient(t, c)
	mustPut(t, cli, "k", "v")
	c.Kill(1)
	c.Kill(2)
	short, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if _, err := cli.Put(short, "k", "lost"); err == nil {
		t.Fatal("Put succeeded without a quorum")
	}
	if err := c.Healthy(0); err == nil {
		t.Fatal("member without a quorum reports healthy")
	}
	c.Restart(2) // two of three: quorum again
	c.WaitHealthy()
	mustPut(t, cli, "k", "back")
	mustGet(t, cli, "k", "back")
}

func TestTLS(t *testing.T) {
	c := StartWith(t, Options{Members: 3, TLS: true})
	for _, ep := range c.Endpoints() {
		if !strings.HasPrefix(ep, "https://127.0.0.1:") {
			t.Fatalf("endpoint %q is not https", ep)
		}
	}
	f := c.TLS()
	if f == nil || f.CAFile == "" || f.CertFile == "" || f.KeyFile == "" {
		t.Fatalf("TLS files %+v", f)
	}
	cli := newClient(t, c)
	mustPut(t, cli, "k", "tls")
	mustGet(t, cli, "k", "tls")

	// Without a client certificate the members refuse the client.
	cfg := c.ClientTLSConfig()
	cfg.Certificates = nil
	anon, err := clientv3.New(clientv3.Config{
		Endpoints: c.Endpoints(), DialTimeout: 2 * time.Second, TLS: cfg, Logger: zap.NewNop(),
	})
	if err == nil {
		defer anon.Close()
		short, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		if _, err := anon.Get(short, "k"); err == nil {
			t.Fatal("Get without a client certificate succeeded")
		}
	}
}

// TestClientCompat exercises the parts of the v3.7 client API that cluster
// mode is likely to use against the 3.4 server: transactions, leases,
// member listing, compaction, and a watch from a compacted revision (the
// signal for a full resync).
func TestClientCompat(t *testing.T) {
	c := Start(t, 1)
	cli := newClient(t, c)

	put, err := cli.Put(ctx(t), "p/a", "1")
	if err != nil {
		t.Fatal(err)
	}
	txn, err := cli.Txn(ctx(t)).
		If(clientv3.Compare(clientv3.ModRevision("p/a"), "=", put.Header.Revision)).
		Then(clientv3.OpPut("p/b", "2"), clientv3.OpDelete("p/a")).
		Commit()
	if err != nil || !txn.Succeeded {
		t.Fatalf("Txn: %v, succeeded %v", err, txn != nil && txn.Succeeded)
	}
	get, err := cli.Get(ctx(t), "p/", clientv3.WithPrefix())
	if err != nil || len(get.Kvs) != 1 || string(get.Kvs[0].Key) != "p/b" {
		t.Fatalf("Get prefix: %v %v", err, get)
	}

	lease, err := cli.Grant(ctx(t), 60)
	if err != nil {
		t.Fatalf("Grant: %v", err)
	}
	if _, err := cli.Put(ctx(t), "leased", "x", clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.KeepAliveOnce(ctx(t), lease.ID); err != nil {
		t.Fatalf("KeepAliveOnce: %v", err)
	}
	if _, err := cli.Revoke(ctx(t), lease.ID); err != nil {
		t.Fatalf("Revoke: %v", err)
	}

	members, err := cli.MemberList(ctx(t))
	if err != nil || len(members.Members) != 1 {
		t.Fatalf("MemberList: %v %v", err, members)
	}
	// The serializable option is new in the 3.6 API; a 3.4 server ignores
	// the field and answers.
	if _, err := cli.MemberList(ctx(t), clientv3.WithSerializable()); err != nil {
		t.Fatalf("MemberList serializable: %v", err)
	}

	// A progress notification tells an idle watcher the current revision.
	// The request must carry the watch's context (its metadata picks the
	// stream), and follow the watch's creation.
	pctx, pcancel := context.WithCancel(ctx(t))
	defer pcancel()
	pctx = clientv3.WithRequireLeader(pctx)
	pch := cli.Watch(pctx, "idle", clientv3.WithCreatedNotify())
	if cr := <-pch; !cr.Created {
		t.Fatalf("watch response %+v is not the creation", cr)
	}
	if err := cli.RequestProgress(pctx); err != nil {
		t.Fatalf("RequestProgress: %v", err)
	}
	if pr := <-pch; !pr.IsProgressNotify() || pr.Header.Revision == 0 {
		t.Fatalf("watch response %+v is not a progress notification", pr)
	}

	for i := range 3 {
		if _, err := cli.Put(ctx(t), "c", string(rune('0'+i))); err != nil {
			t.Fatal(err)
		}
	}
	head, err := cli.Get(ctx(t), "c")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx(t), head.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatalf("Compact: %v", err)
	}
	wctx, cancel := context.WithCancel(ctx(t))
	defer cancel()
	wr := <-cli.Watch(wctx, "c", clientv3.WithRev(put.Header.Revision))
	if wr.CompactRevision != head.Header.Revision {
		t.Fatalf("watch from a compacted revision: CompactRevision %d (err %v), want %d",
			wr.CompactRevision, wr.Err(), head.Header.Revision)
	}
}

// occupy listens on a loopback port until the test ends or release is
// called.
func occupy(t *testing.T, port int) (release func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatalf("occupying port %d: %v", port, err)
	}
	t.Cleanup(func() { l.Close() })
	return func() { l.Close() }
}

// TestPortStolenBeforeBind: a port taken between the probe and etcd's bind
// makes Start try again on other ports instead of failing the test.
func TestPortStolenBeforeBind(t *testing.T) {
	var attempts []int
	c := start(t, Options{Members: 3}, func(attempt int, ports []int) {
		attempts = append(attempts, attempt)
		if attempt == 1 {
			occupy(t, ports[3]) // member 1's peer port
		}
	})
	if fmt.Sprint(attempts) != "[1 2]" {
		t.Fatalf("boot attempts %v, want [1 2]", attempts)
	}
	if !strings.Contains(c.Log(1), "address already in use") {
		t.Errorf("member 1's log does not show the first attempt's bind failure")
	}
	cli := newClient(t, c)
	mustPut(t, cli, "k", "v")
	mustGet(t, cli, "k", "v")
}

// TestRestartWaitsForItsPort: a killed member's port taken by another
// process delays its restart until the port is free again.
func TestRestartWaitsForItsPort(t *testing.T) {
	c := Start(t, 1)
	cli := newClient(t, c)
	mustPut(t, cli, "k", "v")
	c.Kill(0)
	_, portStr, err := net.SplitHostPort(strings.TrimPrefix(c.Endpoint(0), "http://"))
	if err != nil {
		t.Fatal(err)
	}
	port, _ := strconv.Atoi(portStr)
	release := occupy(t, port)
	go func() {
		// Free the port once the member has failed to bind it at least
		// once (its first run bound it, so the log had no such line).
		for !strings.Contains(c.Log(0), "address already in use") {
			time.Sleep(10 * time.Millisecond)
		}
		release()
	}()
	c.Restart(0)
	mustGet(t, cli, "k", "v")
}

// fakeTB records a Skip or Fatal instead of ending the real test.
type fakeTB struct {
	testing.TB
	skipped, failed string
}

func (f *fakeTB) Helper() {}
func (f *fakeTB) Skipf(format string, args ...any) {
	f.skipped = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func runFake(t *testing.T, path string) *fakeTB {
	f := &fakeTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		requireBinary(f, path)
	}()
	<-done
	return f
}

// TestMissingBinary follows the e2e harness's rule for a missing Nix
// client: skip locally, fail under CI, and name the package to install.
func TestMissingBinary(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "etcd")
	t.Setenv("CI", "")
	if f := runFake(t, missing); f.failed != "" || !strings.Contains(f.skipped, "apt-get install -y etcd-server") {
		t.Errorf("without CI: skipped %q, failed %q", f.skipped, f.failed)
	}
	t.Setenv("CI", "1")
	if f := runFake(t, missing); f.skipped != "" || !strings.Contains(f.failed, "apt-get install -y etcd-server") {
		t.Errorf("with CI: skipped %q, failed %q", f.skipped, f.failed)
	}
	if _, err := os.Stat(Binary); err != nil {
		return
	}
	if f := runFake(t, Binary); f.skipped != "" || f.failed != "" {
		t.Errorf("with %s present: skipped %q, failed %q", Binary, f.skipped, f.failed)
	}
}
