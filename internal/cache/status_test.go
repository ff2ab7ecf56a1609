package cache

import (
	"maps"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// LatestRejections walks the time index: newest first, the latest refusal
// of each path, at most n.
func TestLatestRejections(t *testing.T) {
	db, _ := openTestDB(t)
	if got, err := db.LatestRejections(5); err != nil || len(got) != 0 {
		t.Fatalf("empty log: %+v, %v", got, err)
	}
	for i, h := range []string{hashA, hashB, hashC, hashD} {
		must(t, db.RecordRejection(Rejection{StorePath: sp(h, "p"), Reason: "unattested", Last: t0.Add(time.Duration(i) * time.Minute)}))
	}
	// hashA again, newest now.
	must(t, db.RecordRejection(Rejection{StorePath: sp(hashA, "p"), Reason: "denied", Deriver: sp(hashE, "p.drv"), Last: t0.Add(time.Hour)}))
	got, err := db.LatestRejections(3)
	must(t, err)
	var paths []string
	for _, r := range got {
		paths = append(paths, r.StorePath)
	}
	want := []string{sp(hashA, "p"), sp(hashD, "p"), sp(hashC, "p")}
	if len(got) != 3 || paths[0] != want[0] || paths[1] != want[1] || paths[2] != want[2] {
		t.Fatalf("LatestRejections(3) = %v, want %v", paths, want)
	}
	if got[0].Reason != "denied" || got[0].Count != 2 || got[0].Deriver != sp(hashE, "p.drv") {
		t.Errorf("latest entry: %+v", got[0])
	}
}

func TestAttestationsByKey(t *testing.T) {
	db, _ := openTestDB(t)
	_, err := db.PutAttestations([]policy.Attestation{
		attestation(hashA, "r1", "s1"), attestation(hashB, "r1", "s2"), attestation(hashA, "r2", "s3"),
	}, nil)
	must(t, err)
	got, err := db.AttestationsByKey()
	must(t, err)
	want := map[string]int{attestation(hashA, "r1", "").PublicKey: 2, attestation(hashA, "r2", "").PublicKey: 1}
	if !maps.Equal(got, want) {
		t.Errorf("AttestationsByKey = %v, want %v", got, want)
	}
}
