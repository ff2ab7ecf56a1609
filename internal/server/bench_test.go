package server

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkNarInfoHit measures the hottest request, a narinfo served from
// the store, against a reference measured in the same process: a handler
// that writes the same bytes from memory (the floor net/http allows). It reports the ratio of request rates
// (x_vs_static; 1 means as fast as the reference).
//
//	go test -run - -bench NarInfoHit ./internal/server/
func BenchmarkNarInfoHit(b *testing.B) {
	f := newFixture(b)
	var objs []*storeObj
	for i := range 64 {
		o := newObj(b, fmt.Sprintf("bench-%d", i), dirNAR(b, int64(i), 64), "zstd")
		f.up.publish(o)
		f.attest(o)
		objs = append(objs, o)
	}
	bodies := map[string][]byte{}
	for _, o := range objs {
		resp, body := f.mustGet("/" + o.hash + ".narinfo")
		if resp.StatusCode != 200 {
			b.Fatalf("warm-up: %d", resp.StatusCode)
		}
		bodies["/"+o.hash+".narinfo"] = body
	}
	static := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, ok := bodies[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/x-nix-narinfo")
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		w.Write(body)
	}))
	defer static.Close()

	run := func(base string) time.Duration {
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
		var i atomic.Int64
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				o := objs[i.Add(1)%int64(len(objs))]
				resp, err := client.Get(base + "/" + o.hash + ".narinfo")
				if err != nil {
					b.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Errorf("status %d", resp.StatusCode)
				}
			}
		})
		return time.Since(start)
	}
	b.ResetTimer()
	proxy := run(f.proxy.URL)
	ref := run(static.URL)
	b.StopTimer()
	b.ReportMetric(float64(ref)/float64(proxy), "x_vs_static")
}
