package server

import (
	"fmt"
	"io"
	"net/http"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/gate"
)

// attestStatus names each import outcome on the wire.
var attestStatus = [...]string{
	gate.AttestStored:       adminapi.AttestStored,
	gate.AttestKnown:        adminapi.AttestKnown,
	gate.AttestNoAttester:   adminapi.AttestNoAttester,
	gate.AttestBadSignature: adminapi.AttestBadSignature,
}

// handleAttest imports rebuild attestations: `nix path-info --json --sigs`
// output in any of its shapes, or narinfo text. A body that does not parse
// changes nothing.
//
// Why is the reason query parameter (the body is Nix's own output, with no
// room for one).
func (s *Server) handleAttest(w http.ResponseWriter, r *http.Request) {
	reason := r.URL.Query().Get("reason")
	if len(reason) > maxReasonLen {
		s.refuse(w, r, cache.ActionAttest, nil, "", fmt.Errorf("a reason of %d bytes; at most %d", len(reason), maxReasonLen))
		return
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAdminBody))
	if err != nil {
		s.refuse(w, r, cache.ActionAttest, nil, reason, fmt.Errorf("read request body: %v", err))
		return
	}
	claims, err := attest.Parse(raw, s.cfg.StoreDir)
	if err != nil {
		s.refuse(w, r, cache.ActionAttest, nil, reason, fmt.Errorf("attestations not imported: %v", err))
		return
	}
	res, err := s.gate.Attest(change(r, reason), claims)
	if err != nil {
		writeGateError(w, "attestations not imported: ", err)
		return
	}
	out := adminapi.AttestResponse{Results: make([]adminapi.AttestResult, len(res)), Counts: map[string]int{}}
	for i, x := range res {
		out.Results[i] = adminapi.AttestResult{Path: x.Path, Key: x.Key, Status: attestStatus[x.Outcome]}
		out.Counts[out.Results[i].Status]++
	}
	writeJSON(w, http.StatusOK, out)
}
