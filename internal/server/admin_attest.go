package server

import (
	"net/http"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// handleAttest imports rebuild attestations: `nix path-info --json --sigs`
// output in any of its shapes, or narinfo text. Only signatures by
// configured attester keys that verify over the claim's own fingerprint are
// stored; whether that fingerprint matches what upstream serves is decided
// later, per request, by the policy. A body that does not parse changes
// nothing.
func (s *Server) handleAttest(w http.ResponseWriter, r *http.Request) {
	raw, ok := readBody(w, r)
	if !ok {
		return
	}
	claims, err := attest.Parse(raw, s.cfg.StoreDir)
	if err != nil {
		writeError(w, http.StatusBadRequest, "attestations not imported: %v", err)
		return
	}
	now := s.now()
	var results []adminapi.AttestResult
	var toStore []cache.Attestation
	var storeIdx []int
	for _, c := range claims {
		fp, err := c.Fingerprint(s.cfg.StoreDir)
		if err != nil {
			writeError(w, http.StatusBadRequest, "attestations not imported: %s: %v", c.StorePath, err)
			return
		}
		found := false
		for _, sig := range c.Sigs {
			name, _, _ := strings.Cut(sig, ":")
			for _, key := range s.policy.Attesters {
				if key.Name != name {
					continue
				}
				found = true
				if !key.Verify(fp, sig) {
					results = append(results, adminapi.AttestResult{Path: c.StorePath, Key: key.Name, Status: adminapi.AttestBadSignature})
					continue
				}
				storeIdx = append(storeIdx, len(results))
				results = append(results, adminapi.AttestResult{Path: c.StorePath, Key: key.Name})
				toStore = append(toStore, attestation(c, key, sig, now))
			}
		}
		if !found {
			results = append(results, adminapi.AttestResult{Path: c.StorePath, Status: adminapi.AttestNoAttester})
		}
	}
	stored, err := s.db.PutAttestations(toStore)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "store attestations: %v", err)
		return
	}
	for i, st := range stored {
		results[storeIdx[i]].Status = string(st)
	}
	counts := map[string]int{}
	for _, res := range results {
		counts[res.Status]++
	}
	s.refreshGauges()
	s.log.Info("attestations imported", "paths", len(claims), "counts", counts)
	writeJSON(w, http.StatusOK, adminapi.AttestResponse{Results: results, Counts: counts})
}

func attestation(c attest.Claim, key verify.PublicKey, sig string, now time.Time) cache.Attestation {
	return cache.Attestation{StorePath: c.StorePath, NarHash: c.NarHash, NarSize: c.NarSize, References: c.References,
		Deriver: c.Deriver, KeyName: key.Name, PublicKey: key.String(), Sig: sig, Imported: now}
}
