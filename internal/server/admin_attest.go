package server

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/cache"
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
// output in any of its shapes, or narinfo text. A body that does not parse
// changes nothing: it is read once to check every entry, spooled to a
// temporary file as it arrives, and only then imported from the file (see
// gate.AttestStream), so memory does not grow with the body.
//
// Why is the reason query parameter (the body is Nix's own output, with no
// room for one).
func (s *Server) handleAttest(w http.ResponseWriter, r *http.Request) {
	reason := r.URL.Query().Get("reason")
	if len(reason) > maxReasonLen {
		s.refuse(w, r, cache.ActionAttest, nil, "", fmt.Errorf("a reason of %d bytes; at most %d", len(reason), maxReasonLen))
		return
	}
	body := io.Reader(http.MaxBytesReader(w, r.Body, maxAttestBody))
	if s.Limits.ReadBody > 0 {
		// The body is read as fast as it is checked: the read deadline
		// bounds a stalled client, not the length of the import.
		body = &progressDeadline{r: body, rc: http.NewResponseController(w), d: s.Limits.ReadBody}
	}
	spool, err := os.CreateTemp("", "cacheproxy-attest-*.json")
	if err != nil {
		writeError(w, http.StatusInternalServerError, "attestations not imported: spool the request: %v", err)
		return
	}
	defer func() {
		spool.Close()
		os.Remove(spool.Name())
	}()
	// First pass: every entry parses, or nothing is imported.
	if err := checkAttestations(io.TeeReader(body, spool), s.cfg.StoreDir); err != nil {
		s.refuse(w, r, cache.ActionAttest, nil, reason, fmt.Errorf("attestations not imported: %w", err))
		return
	}
	if _, err := spool.Seek(0, io.SeekStart); err != nil {
		writeError(w, http.StatusInternalServerError, "attestations not imported: %v", err)
		return
	}
	dec, err := attest.NewDecoder(bufio.NewReaderSize(spool, 256<<10), s.cfg.StoreDir)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "attestations not imported: read the spooled request: %v", err)
		return
	}
	// One result per path and key, kept until the answer is written: the
	// path strings are the claims' own, so about 100 bytes per path.
	var results []gate.AttestResult
	err = s.gate.AttestStream(change(r, reason), dec.Next, func(x gate.AttestResult) { results = append(results, x) })
	if err != nil {
		writeGateError(w, "attestations not imported: ", err)
		return
	}
	counts := map[string]int{}
	for _, x := range results {
		counts[attestStatus[x.Outcome]]++
	}
	if s.Limits.Write > 0 && s.Limits.MinRate > 0 {
		extendWrite(w, s.Limits.Write+time.Duration(int64(len(results))*128/s.Limits.MinRate)*time.Second)
	}
	writeAttestResponse(w, results, counts)
}

// checkAttestations reads every entry of an import, keeping none: each must
// parse and have a fingerprint.
func checkAttestations(r io.Reader, storeDir string) error {
	dec, err := attest.NewDecoder(r, storeDir)
	if err != nil {
		return err
	}
	for {
		c, err := dec.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if _, err := c.Fingerprint(storeDir); err != nil {
			return fmt.Errorf("%s: %w", c.StorePath, err)
		}
	}
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
