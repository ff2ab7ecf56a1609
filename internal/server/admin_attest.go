package server

import (
	"log/slog"
	"net/http"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/attest"
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
func (s *Server) handleAttest(w http.ResponseWriter, r *http.Request) {
	raw, ok := readBody(w, r, maxAdminBody)
	if !ok {
		return
	}
	claims, err := attest.Parse(raw, s.cfg.StoreDir)
	if err != nil {
		writeError(w, http.StatusBadRequest, "attestations not imported: %v", err)
		return
	}
	res, err := s.gate.Attest(claims)
	if err != nil {
		writeGateError(w, "attestations not imported: ", err)
		return
	}
	out := adminapi.AttestResponse{Results: make([]adminapi.AttestResult, len(res)), Counts: map[string]int{}}
	for i, x := range res {
		out.Results[i] = adminapi.AttestResult{Path: x.Path, Key: x.Key, Status: attestStatus[x.Outcome]}
		out.Counts[out.Results[i].Status]++
	}
	attrs := []any{"paths", len(claims)}
	for _, st := range attestStatus {
		attrs = append(attrs, slog.Int(st, out.Counts[st]))
	}
	s.log.Info("attestations imported", attrs...)
	writeJSON(w, http.StatusOK, out)
}
