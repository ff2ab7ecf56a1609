package server

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/gate"
)

// maxAttestBody bounds an attestation import. It is read as a stream, one
// entry (attest.MaxEntrySize) at a time, so the bound is on time and disk,
// not memory: a million paths' path-info JSON is under 2 GiB.
const maxAttestBody = 4 << 30

// attestStatus names each import outcome on the wire.
var attestStatus = [...]string{
	gate.AttestStored:       adminapi.AttestStored,
	gate.AttestKnown:        adminapi.AttestKnown,
	gate.AttestNoAttester:   adminapi.AttestNoAttester,
	gate.AttestBadSignature: adminapi.AttestBadSignature,
}

// handleAttest imports rebuild attestations: `nix path-info --json --sigs`
// output in any of its shapes, or narinfo text, read and stored as it
// arrives (see gate.AttestStream). A body that does not parse stores
// nothing from the batch of the bad entry on; the error names the entry.
func (s *Server) handleAttest(w http.ResponseWriter, r *http.Request) {
	body := io.Reader(http.MaxBytesReader(w, r.Body, maxAttestBody))
	if s.Limits.ReadBody > 0 {
		// The body is read as fast as it is imported: the read deadline
		// bounds a stalled client, not the length of the import.
		body = &progressDeadline{r: body, rc: http.NewResponseController(w), d: s.Limits.ReadBody}
	}
	dec, err := attest.NewDecoder(body, s.cfg.StoreDir)
	if err != nil {
		writeError(w, http.StatusBadRequest, "attestations not imported: %v", err)
		return
	}
	// One result per path and key, kept until the answer is written: the
	// path strings are the claims' own, so about 100 bytes per path.
	var results []gate.AttestResult
	var parseErr error
	next := func() (attest.Claim, error) {
		c, err := dec.Next()
		if err != nil && err != io.EOF {
			parseErr = err
		}
		return c, err
	}
	err = s.gate.AttestStream(next, func(x gate.AttestResult) { results = append(results, x) })
	counts := map[string]int{}
	for _, x := range results {
		counts[attestStatus[x.Outcome]]++
	}
	switch {
	case err != nil && parseErr != nil && errors.Is(err, parseErr):
		msg := fmt.Sprintf("attestations not imported: %v", err)
		if n := counts[adminapi.AttestStored]; n > 0 {
			msg = fmt.Sprintf("attestations not imported from the batch of %d entries holding the error on: %v (%d signatures before it were stored; importing the corrected input again is safe)", gate.AttestBatch, err, n)
		}
		writeError(w, http.StatusBadRequest, "%s", msg)
		return
	case err != nil:
		writeGateError(w, "attestations not imported: ", err)
		return
	}
	attrs := []any{"results", len(results)}
	for _, st := range attestStatus {
		attrs = append(attrs, slog.Int(st, counts[st]))
	}
	s.log.Info("attestations imported", attrs...)
	if s.Limits.Write > 0 && s.Limits.MinRate > 0 {
		extendWrite(w, s.Limits.Write+time.Duration(int64(len(results))*128/s.Limits.MinRate)*time.Second)
	}
	writeAttestResponse(w, results, counts)
}

// writeAttestResponse writes an adminapi.AttestResponse one result at a
// time, rather than encoding the whole answer in memory first.
func writeAttestResponse(w http.ResponseWriter, results []gate.AttestResult, counts map[string]int) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 64<<10)
	bw.WriteString("{\n  \"results\": [")
	for i, x := range results {
		if i > 0 {
			bw.WriteByte(',')
		}
		line, _ := json.Marshal(adminapi.AttestResult{Path: x.Path, Key: x.Key, Status: attestStatus[x.Outcome]})
		bw.WriteString("\n    ")
		bw.Write(line)
	}
	if len(results) > 0 {
		bw.WriteString("\n  ")
	}
	c, _ := json.MarshalIndent(counts, "  ", "  ")
	bw.WriteString("],\n  \"counts\": ")
	bw.Write(c)
	bw.WriteString("\n}\n")
	bw.Flush()
}

// progressDeadline moves the connection's read deadline on with every read.
type progressDeadline struct {
	r  io.Reader
	rc *http.ResponseController
	d  time.Duration
}

func (p *progressDeadline) Read(b []byte) (int, error) {
	p.rc.SetReadDeadline(time.Now().Add(p.d))
	return p.r.Read(b)
}
