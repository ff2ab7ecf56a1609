package gate

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
)

// Every admin change, removals and refusals included, is logged as one
// structured line and recorded with who, what and why; replacing an
// allowlist entry keeps the old one.
func TestAdminChangesAreAudited(t *testing.T) {
	f := newFixture(t, false)
	app := newObj("app-1.0")
	f.up.publish(app)
	ctx := context.Background()
	alice := Change{Who: "alice", Reason: "first review"}

	if _, replaced, err := f.g.Allow(ctx, alice, []string{app.hash}, false, time.Time{}); err != nil || len(replaced) != 0 {
		t.Fatalf("allow: %v, replaced %v", err, replaced)
	}
	bob := Change{Who: "bob", Reason: "second review"}
	_, replaced, err := f.g.Allow(ctx, bob, []string{app.hash}, false, f.g.now().Add(time.Hour))
	if err != nil || len(replaced) != 1 || replaced[0].Reason != "first review" {
		t.Fatalf("allow again: %v, replaced %+v, want the first entry", err, replaced)
	}
	if _, _, err := f.g.RemoveAllow(Change{Who: "carol", Reason: "revoked"}, []string{app.hash}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.g.Deny(alice, []string{"openssl-3.0.7"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("deny of a bare name: %v", err)
	}
	if _, err := f.g.Deny(alice, []string{"*-evil-*"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.g.RemoveDeny(alice, []string{"*-evil-*"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.g.Retry(alice, []string{app.hash}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.g.Attest(Change{Who: "rebuilder"}, attestClaims(t, app.signed(f.rebuilder))); err != nil {
		t.Fatal(err)
	}
	f.g.Refused(alice, cache.ActionAllowRemove, nil, errors.New("malformed JSON request"))

	recs, err := f.g.Audit(time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ who, action, outcome string }{
		{"alice", cache.ActionAllowAdd, cache.OutcomeOK},
		{"bob", cache.ActionAllowAdd, cache.OutcomeReplaced},
		{"carol", cache.ActionAllowRemove, cache.OutcomeOK},
		{"alice", cache.ActionDenyAdd, cache.OutcomeFailed},
		{"alice", cache.ActionDenyAdd, cache.OutcomeOK},
		{"alice", cache.ActionDenyRemove, cache.OutcomeOK},
		{"alice", cache.ActionRetry, cache.OutcomeFailed},
		{"rebuilder", cache.ActionAttest, cache.OutcomeOK},
		{"alice", cache.ActionAllowRemove, cache.OutcomeFailed},
	}
	if len(recs) != len(want) {
		t.Fatalf("%d audit records, want %d: %+v", len(recs), len(want), recs)
	}
	for i, w := range want {
		if r := recs[i]; r.Who != w.who || r.Action != w.action || r.Outcome != w.outcome {
			t.Errorf("record %d: %s %s %s, want %+v", i, r.Who, r.Action, r.Outcome, w)
		}
	}
	if r := recs[1]; len(r.PreviousAllow) != 1 || r.PreviousAllow[0].Reason != "first review" || r.Reason != "second review" ||
		len(r.What) != 1 || r.What[0] != app.ni.StorePath {
		t.Errorf("replacing record: %+v", r)
	}
	if r := recs[2]; r.Reason != "revoked" || len(r.PreviousAllow) != 1 || r.PreviousAllow[0].Reason != "second review" {
		t.Errorf("removing record: %+v", r)
	}
	if r := recs[3]; !strings.Contains(r.Error, "*-openssl-3.0.7*") || len(r.What) != 1 {
		t.Errorf("refused deny record: %+v", r)
	}

	logs := f.logs.String()
	if strings.Contains(logs, "map[") {
		t.Errorf("logs print a Go map:\n%s", logs)
	}
	for _, line := range []string{
		`msg="admin change" who=alice action=allow_add outcome=ok`,
		`who=bob action=allow_add outcome=replaced`,
		`previous="` + app.ni.StorePath + ` reason=\"first review\" expires=never"`,
		`who=carol action=allow_remove outcome=ok what=` + app.hash + ` reason=revoked counts.removed=1`,
		`msg="admin change refused" who=alice action=deny_add outcome=failed`,
		`who=alice action=deny_remove outcome=ok`,
		`who=alice action=retry outcome=failed`,
		`who=rebuilder action=attest_import outcome=ok what=` + app.ni.StorePath + ` reason="" counts.stored=1`,
	} {
		if !strings.Contains(logs, line) {
			t.Errorf("no log line with %s:\n%s", line, logs)
		}
	}
}
