package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/cacheproxy/cacheproxy/internal/etcdtest"
	"github.com/cacheproxy/cacheproxy/internal/roundrobin"
)

// Kill ends the server with SIGKILL, as a crashed machine would.
func (p *Proxy) Kill() {
	if p.cmd != nil && p.cmd.Process != nil {
		p.cmd.Process.Kill()
		<-p.exited
	}
}

// The whole cluster, as a fleet sees it: three cacheproxy nodes sharing
// one trust state through a real three-member etcd cluster (TLS with client
// certificates), behind a round-robin load balancer, and real Nix clients.
// Evidence written on one node is enforced on the others; one etcd member
// and one node die while clients substitute, and none of them fails; with
// etcd's quorum lost the nodes keep serving and refuse admin changes; a
// quarantine on one node holds on all, and a retry on another lifts it.
func TestCluster(t *testing.T) {
	t.Parallel()
	etcd := etcdtest.StartWith(t, etcdtest.Options{Members: 3, TLS: true})
	files := etcd.TLS()
	gk, err := generateKey(t.TempDir(), "cluster-gatekeeper-1")
	if err != nil {
		t.Fatal(err)
	}
	up := newUpstream(t, upKey)
	var cs []Closure
	for range 4 {
		c := buildClosure(t, ClosureOpts{})
		up.Publish(t, "xz", c.App)
		cs = append(cs, c)
	}
	cfg := ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}, SigningKeyFile: gk.SecFile,
		Extra: fmt.Sprintf("[cluster]\netcd = %s\nca_file = %s\ncert_file = %s\nkey_file = %s\n",
			tomlList(etcd.Endpoints()), tomlStr(files.CAFile), tomlStr(files.CertFile), tomlStr(files.KeyFile))}
	var nodes []*Proxy
	var urls []string
	for i := range 3 {
		n := startProxy(t, cfg)
		if n.GatekeeperKey != gk.Pub {
			t.Fatalf("node %d signs with %s, want the shared key %s", i, n.GatekeeperKey, gk.Pub)
		}
		nodes, urls = append(nodes, n), append(urls, n.URL)
	}
	lb := roundrobin.New(urls)
	t.Cleanup(lb.Close)

	// Unattested: refused through every node.
	cl := newClient(t)
	if out, err := cl.Substitute(t, lb.URL, gk.Pub, cs[0].App); err == nil {
		t.Fatalf("unattested closure substituted:\n%s", out)
	}

	// Imported on node 0, enforced on nodes 1 and 2.
	nodes[0].Attest(t, attestFile(t, rb1Key, append(append(cs[0].Paths(), cs[1].Paths()...), cs[3].Paths()...)...))
	for i, n := range nodes[1:] {
		eventually(t, 10*time.Second, func() error {
			if code, dec, _ := n.NarinfoDecision(t, cs[0].App); code != 200 {
				return fmt.Errorf("node %d: %d %s", i+1, code, dec)
			}
			return nil
		})
	}

	// A deny on node 0 stops node 1 serving the NAR to a client that
	// already holds the narinfo; removing it serves it again.
	ni := nodes[1].ExpectApproved(t, cs[1].Leaf)
	nar := "/" + ni.Get("URL")
	nodes[0].MustCLI(t, "deny add", "--reason", "cluster test", string(cs[1].Leaf))
	eventually(t, 10*time.Second, func() error {
		resp, _, err := nodes[1].Get(t, nar)
		if err != nil {
			return err
		}
		if dec := resp.Header.Get("X-Cacheproxy-Decision"); resp.StatusCode != 404 || dec != "rejected; reason=denied" {
			return fmt.Errorf("NAR of a denied path on node 1: %d %q", resp.StatusCode, dec)
		}
		return nil
	})
	nodes[2].MustCLI(t, "deny remove", string(cs[1].Leaf))
	eventually(t, 10*time.Second, func() error {
		if resp, _, err := nodes[1].Get(t, nar); err != nil || resp.StatusCode != 200 {
			return fmt.Errorf("NAR after the deny was removed on node 2: %v %v", resp, err)
		}
		return nil
	})
	// The audit trail of those changes is on every node.
	for i, n := range nodes {
		out := n.MustCLI(t, "audit", "--json")
		if !strings.Contains(out, "deny_add") || !strings.Contains(out, "deny_remove") || !strings.Contains(out, "attest_import") {
			t.Errorf("node %d's audit trail lacks the cluster's changes:\n%s", i, out)
		}
	}

	// A record written straight into etcd with a bad signature is refused
	// by every node, counted and logged.
	cli, err := clientv3.New(clientv3.Config{Endpoints: etcd.Endpoints(), TLS: etcd.ClientTLSConfig(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	forged, _ := json.Marshal(map[string]any{"store_path": string(cs[2].Leaf), "nar_hash": strings.Repeat("ab", 32),
		"nar_size": 1234, "references": []string{}, "key_name": rb1Key.Name, "public_key": rb1Key.Pub,
		"sig": rb1Key.Sign("1;" + string(cs[2].Leaf) + ";sha256:forged;1;"), "imported": time.Now()})
	if _, err := cli.Put(context.Background(), "/cacheproxy/attestations/"+cs[2].Leaf.Hash()+"/"+rb1Key.Pub, string(forged)); err != nil {
		t.Fatal(err)
	}
	for i, n := range nodes {
		eventually(t, 10*time.Second, func() error {
			if v := n.MetricSum(t, "cacheproxy_cluster_rejected_records_total", map[string]string{"kind": "attestations"}); v < 1 {
				return fmt.Errorf("node %d: cacheproxy_cluster_rejected_records_total = %v", i, v)
			}
			return nil
		})
		if !n.LogsContain("cluster: record refused", cs[2].Leaf.Hash()) {
			t.Errorf("node %d did not log the forged record", i)
		}
		n.ExpectRejected(t, cs[2].Leaf, "unattested")
	}
	if _, err := cli.Delete(context.Background(), "/cacheproxy/attestations/"+cs[2].Leaf.Hash()+"/"+rb1Key.Pub); err != nil {
		t.Fatal(err)
	}

	// Clients substitute while one etcd member and one node die.
	var wg sync.WaitGroup
	failures := make(chan string, 16)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 3 {
				c := cs[(i+j)%2]
				cl := newClient(t)
				if out, err := cl.Substitute(t, lb.URL, gk.Pub, c.App); err != nil || !cl.Has(c.Leaf) {
					failures <- fmt.Sprintf("client %d round %d: %v\n%s", i, j, err, out)
				}
			}
		}()
	}
	time.Sleep(150 * time.Millisecond)
	etcd.Kill(0)
	nodes[2].Kill()
	wg.Wait()
	close(failures)
	for f := range failures {
		t.Errorf("a substitution failed while a node and an etcd member died: %s", f)
	}
	if lb.Failures(2) == 0 {
		t.Error("no request met the dead node: it did not die while clients substituted")
	}
	nodes = nodes[:2]

	// Two members left are a quorum: a change on node 1 reaches node 0.
	// Right after a member died the two may still be electing a leader
	// (longer on a loaded machine): the change is refused whole ("nothing
	// was changed") and an operator runs it again, as this does.
	file := attestFile(t, rb1Key, cs[2].Paths()...)
	eventually(t, 20*time.Second, func() error {
		_, errOut, err := nodes[1].CLI(t, "attest import", file)
		if err != nil && !strings.Contains(errOut, "nothing was changed") {
			t.Fatalf("attest import with one etcd member down: %v\n%s", err, errOut)
		}
		if err != nil {
			return fmt.Errorf("attest import with one etcd member down: %v: %s", err, errOut)
		}
		return nil
	})
	eventually(t, 10*time.Second, func() error {
		if code, dec, _ := nodes[0].NarinfoDecision(t, cs[2].App); code != 200 {
			return fmt.Errorf("node 0 after an import on node 1 with one etcd member down: %d %s", code, dec)
		}
		return nil
	})

	// Quorum lost: nodes serve on their mirror, say so, refuse changes.
	etcd.Kill(1)
	for i, n := range nodes {
		eventually(t, 15*time.Second, func() error {
			resp, body, err := n.Get(t, "/healthz?verbose")
			if err != nil || resp.StatusCode != 200 || !strings.Contains(string(body), "cluster: DEGRADED") {
				return fmt.Errorf("node %d /healthz?verbose without quorum: %v %v\n%s", i, resp, err, body)
			}
			if v := n.MetricSum(t, "cacheproxy_cluster_connected", nil); v != 0 {
				return fmt.Errorf("node %d cacheproxy_cluster_connected = %v", i, v)
			}
			return nil
		})
	}
	if _, body, err := nodes[1].Get(t, "/"); err != nil || !strings.Contains(string(body), "etcd unreachable") {
		t.Errorf("status page without quorum does not say so (%v)", err)
	}
	_, errOut, err := nodes[0].CLI(t, "allow add", "--reason", "no quorum", string(cs[2].Leaf))
	if err == nil || !strings.Contains(errOut, "etcd unreachable") || !strings.Contains(errOut, "nothing was changed") {
		t.Errorf("allow add without quorum: err=%v\n%s", err, errOut)
	}
	if out := nodes[1].MustCLI(t, "allow list"); strings.Contains(out, cs[2].Leaf.Hash()) {
		t.Errorf("a refused change reached a node:\n%s", out)
	}
	cl = newClient(t)
	cl.MustSubstitute(t, lb.URL, gk.Pub, cs[2].App)

	// A node joining now has nothing to decide from: it says so, and
	// answers 503 (which Nix retries) instead of a 404 (which Nix caches
	// for an hour) until it has read the cluster's state.
	joiner := startUnready(t, cfg)

	// etcd back: a NAR that fails verification on node 0 is quarantined on
	// node 1 too; a retry on node 1 lifts it on node 0.
	etcd.Restart(0)
	etcd.Restart(1)
	for i, n := range nodes {
		eventually(t, 15*time.Second, func() error {
			if v := n.MetricSum(t, "cacheproxy_cluster_connected", nil); v != 1 {
				return fmt.Errorf("node %d cacheproxy_cluster_connected = %v after etcd came back", i, v)
			}
			return nil
		})
	}
	// cs[3] was attested at the start and never fetched by any node.
	eventually(t, 20*time.Second, func() error {
		if code, dec, _ := joiner.NarinfoDecision(t, cs[0].App); code != 200 {
			return fmt.Errorf("the joining node after etcd came back: %d %s", code, dec)
		}
		return nil
	})
	victim := cs[3].Leaf
	ni = nodes[0].ExpectApproved(t, victim)
	up.NarHook(t, victim, func(w http.ResponseWriter, r *http.Request, orig []byte) {
		orig[len(orig)/2] ^= 0xff
		w.Write(orig)
	})
	if resp, _, err := nodes[0].Get(t, "/"+ni.Get("URL")); err == nil && resp.StatusCode == 200 {
		t.Fatal("node 0 served a tampered NAR without an error")
	}
	for i, n := range nodes {
		eventually(t, 10*time.Second, func() error {
			if code, dec, _ := n.NarinfoDecision(t, victim); code != 404 || dec != "rejected; reason=nar_mismatch" {
				return fmt.Errorf("node %d after a NAR mismatch on another node: %d %q", i, code, dec)
			}
			return nil
		})
	}
	up.SetHook(nil)
	nodes[1].MustCLI(t, "retry", string(victim))
	eventually(t, 10*time.Second, func() error {
		if code, dec, _ := nodes[0].NarinfoDecision(t, victim); code != 200 {
			return fmt.Errorf("node 0 after a retry on node 1: %d %q", code, dec)
		}
		return nil
	})
}

// startUnready starts a node whose mirror never held its cluster's state,
// while etcd has no quorum, and checks that it refuses traffic the way a
// fleet recovers from: /healthz fails, narinfos get 503 with Retry-After.
// It returns once the node listens; the node is stopped at cleanup.
func startUnready(t *testing.T, cfg ProxyConfig) *Proxy {
	t.Helper()
	p := newProxy(t, cfg)
	p.launch(t)
	eventually(t, 20*time.Second, func() error {
		resp, body, err := doGet(t, p.URL+"/healthz", nil)
		if err != nil {
			return err
		}
		if resp.StatusCode != 503 || !strings.Contains(string(body), "never read from etcd") {
			return fmt.Errorf("/healthz of a node that never read its cluster: %d %s", resp.StatusCode, body)
		}
		return nil
	})
	resp, body, err := doGet(t, p.URL+"/"+strings.Repeat("a", 32)+".narinfo", nil)
	if err != nil || resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("narinfo from a node that never read its cluster: %v %v %s", resp, err, body)
	}
	return p
}
