package gate

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/cache"
)

// An import of many batches reports every outcome in input order and
// records each batch as one change, however many batches storing takes in
// one transaction; a claim that cannot be fingerprinted ends the import:
// the batches before it are stored, its own is refused, none after it is
// stored.
func TestAttestStreamBatches(t *testing.T) {
	claims := func(f *fixture, n int) []attest.Claim {
		var out []attest.Claim
		for i := range n {
			out = append(out, attestClaims(t, newObj(fmt.Sprintf("pkg-%d", i)).signed(f.rebuilder))...)
		}
		return out
	}

	f := newFixture(t, false)
	f.g.batch = 3
	cs := claims(f, 20)
	res, err := f.g.Attest(Change{Who: "rebuilder"}, cs)
	if err != nil || len(res) != len(cs) {
		t.Fatalf("import: %d results, %v", len(res), err)
	}
	for i, r := range res {
		if r.Path != cs[i].StorePath || r.Outcome != AttestStored {
			t.Fatalf("result %d: %+v, want %s stored", i, r, cs[i].StorePath)
		}
	}
	recs, err := f.g.Audit(time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 7 {
		t.Fatalf("%d audit records, want one per batch of 3 (7)", len(recs))
	}
	for i, r := range recs {
		want := min(3, len(cs)-3*i)
		if r.Outcome != cache.OutcomeOK || r.Counts[cache.CountStored] != want || len(r.What) != want || r.What[0] != cs[3*i].StorePath {
			t.Errorf("record %d: %+v, want %d stored from %s", i, r, want, cs[3*i].StorePath)
		}
	}

	f = newFixture(t, false)
	f.g.batch = 3
	cs = claims(f, 20)
	cs[13].NarSize = 0 // in the fifth batch
	res, err = f.g.Attest(Change{Who: "rebuilder"}, cs)
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("import with an invalid claim: %v", err)
	}
	n, err := f.db.CountAttestations()
	if err != nil || n != 12 {
		t.Fatalf("%d attestations stored (%v), want the 12 of the batches before the invalid claim", n, err)
	}
	recs, err = f.g.Audit(time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 5 || recs[4].Outcome != cache.OutcomeFailed || recs[3].Outcome != cache.OutcomeOK {
		t.Fatalf("audit records %+v, want 4 stored batches and the refused one", recs)
	}
}
