package attest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// MaxEntrySize bounds one entry of an input (one path-info object with its
// key, or one narinfo block). Real entries are a few KiB even with thousands
// of references; the bound is what an import holds in memory at most per
// entry, so the size of the whole input does not matter.
const MaxEntrySize = 8 << 20

// errEntryTooLarge is what the input reader returns once an entry runs past
// MaxEntrySize: the JSON decoder passes it on, so the entry is never held
// whole.
var errEntryTooLarge = errors.New("larger than the bound on one entry")

// sizeText names an entry bound for error messages.
func sizeText(n int) string {
	if n >= 1<<20 && n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

// Decoder reads claims from an input one entry at a time, so that an
// import of any size needs memory for one entry (MaxEntrySize), not for the
// whole input. It accepts every shape Parse does. Errors name the entry
// (1-based, with its path when known) and the field; after an error, Next
// returns it again.
type Decoder struct {
	storeDir string
	format   Format
	in       *entryReader
	br       *bufio.Reader
	dec      *json.Decoder // JSON forms
	base     int64         // offset in the input where dec began reading
	n        int           // entries begun
	maxEntry int           // MaxEntrySize but in tests
	err      error         // sticky
	// Invalid lists the absolute store paths the input reports as not valid
	// in the rebuilder's store, so far.
	Invalid []string

	// object form
	started  bool
	inInfo   bool // inside the "info" object of a --json-format 2 envelope
	envelope bool // an "info" member was seen
	paths    bool // a store path key was seen at the top level
	version  json.RawMessage
	seen     map[[16]byte]struct{} // digests of the keys seen, to refuse duplicates

	// narinfo text
	lineNo   int
	leftover []byte // leading white space of the first line, for narinfo text
}

// NewDecoder starts reading an input. It fails on an invalid store dir
// and on input with nothing but white space in it.
func NewDecoder(r io.Reader, storeDir string) (*Decoder, error) {
	if err := narinfo.CheckStoreDir(storeDir); err != nil {
		return nil, fmt.Errorf("attestations: %w", err)
	}
	return newDecoder(r, storeDir, MaxEntrySize)
}

// newDecoder is NewDecoder with another bound on entries (for tests).
func newDecoder(r io.Reader, storeDir string, maxEntry int) (*Decoder, error) {
	in := &entryReader{r: r, stop: -1}
	d := &Decoder{storeDir: storeDir, in: in, br: bufio.NewReaderSize(in, 64<<10), maxEntry: maxEntry}
	// The shape is told by the first byte that is not white space.
	in.limit(int64(d.maxEntry))
	if bom, err := d.br.Peek(3); err == nil && string(bom) == "\xef\xbb\xbf" {
		d.br.Discard(3)
	}
detect:
	for {
		c, err := d.br.ReadByte()
		if err == io.EOF {
			return nil, errors.New("attestations: empty input")
		}
		if err != nil {
			return nil, fmt.Errorf("attestations: read: %w", d.tooLarge(err, "leading white space"))
		}
		switch c {
		case ' ', '\t', '\r':
			d.leftover = append(d.leftover, c)
			continue
		case '\n':
			d.lineNo++
			d.leftover = d.leftover[:0]
			continue
		}
		d.br.UnreadByte()
		switch c {
		case '[':
			d.format = FormatJSONArray
		case '{':
			d.format = FormatJSONObject
			d.seen = map[[16]byte]struct{}{}
		default:
			d.format = FormatNarinfo
		}
		break detect
	}
	if d.format == FormatNarinfo {
		in.stop = -1 // readLine bounds each block itself
		return d, nil
	}
	d.base = in.read - int64(d.br.Buffered())
	d.dec = json.NewDecoder(d.br)
	d.dec.UseNumber()
	return d, nil
}

// Format is the shape of the input.
func (d *Decoder) Format() Format { return d.format }

// Next returns the next claim, or io.EOF after the last one. Entries the
// input marks invalid are skipped and added to Invalid.
func (d *Decoder) Next() (Claim, error) {
	if d.err != nil {
		return Claim{}, d.err
	}
	var c Claim
	var err error
	switch d.format {
	case FormatJSONArray:
		c, err = d.nextArray()
	case FormatJSONObject:
		c, err = d.nextObject()
	default:
		c, err = d.nextNarinfo()
	}
	if err != nil {
		if err != io.EOF {
			err = fmt.Errorf("attestations: %w", err)
		}
		d.err = err
		return Claim{}, err
	}
	return c, nil
}

// entryReader is the input as the decoders see it: reading past stop fails
// with errEntryTooLarge, so one entry can never make them buffer more than
// MaxEntrySize.
type entryReader struct {
	r    io.Reader
	read int64 // bytes handed out
	stop int64 // no bytes past this offset; -1: none
}

func (e *entryReader) Read(p []byte) (int, error) {
	if e.stop >= 0 {
		if e.read >= e.stop {
			return 0, errEntryTooLarge
		}
		if rem := e.stop - e.read; int64(len(p)) > rem {
			p = p[:rem]
		}
	}
	n, err := e.r.Read(p)
	e.read += int64(n)
	return n, err
}

// limit lets the decoders read n bytes past what they have buffered: the
// entry about to be read gets n bytes whatever read-ahead they hold.
func (e *entryReader) limit(n int64) { e.stop = e.read + n }

// allow lets the JSON decoder read up to MaxEntrySize bytes past where it
// is now (its read-ahead counts against that): enough for any entry that
// is within the bound, and never more.
func (d *Decoder) allow() { d.in.stop = d.base + d.dec.InputOffset() + int64(d.maxEntry) + 1 }

// startEntry begins entry d.n+1.
func (d *Decoder) startEntry() {
	d.n++
	d.allow()
}

// tooLarge turns errEntryTooLarge into a message naming what was too large.
func (d *Decoder) tooLarge(err error, what string) error {
	if errors.Is(err, errEntryTooLarge) {
		return fmt.Errorf("%s is larger than %s (%w)", what, sizeText(d.maxEntry), errEntryTooLarge)
	}
	return err
}

func (d *Decoder) jsonErr(err error, what string) error {
	if errors.Is(err, errEntryTooLarge) {
		return d.tooLarge(err, what)
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("invalid JSON: %w", err)
}

// openDelim reads the opening '[' or '{' of the top-level value.
func (d *Decoder) openDelim(want json.Delim) error {
	d.allow()
	tok, err := d.dec.Token()
	if err != nil {
		return d.jsonErr(err, "the input")
	}
	if tok != want {
		return fmt.Errorf("invalid JSON: want %s, got %v", want, tok)
	}
	return nil
}

// closeTop reads the closing delimiter and makes sure nothing follows.
func (d *Decoder) closeTop() error {
	d.allow()
	if _, err := d.dec.Token(); err != nil {
		return d.jsonErr(err, "the input")
	}
	return expectEOF(d.dec)
}

func (d *Decoder) nextArray() (Claim, error) {
	if !d.started {
		d.started = true
		if err := d.openDelim('['); err != nil {
			return Claim{}, err
		}
	}
	for {
		d.allow()
		if !d.dec.More() {
			if err := d.closeTop(); err != nil {
				return Claim{}, err
			}
			return Claim{}, io.EOF
		}
		d.startEntry()
		var raw json.RawMessage
		if err := d.dec.Decode(&raw); err != nil {
			return Claim{}, fmt.Errorf("entry %d: %w", d.n, d.jsonErr(err, "the entry"))
		}
		fields, err := entryFields(raw)
		if err != nil {
			return Claim{}, fmt.Errorf("entry %d: %w", d.n, err)
		}
		p, ok := fields["path"]
		if !ok {
			return Claim{}, fmt.Errorf("entry %d: path: missing", d.n)
		}
		var ps string
		if err := unmarshalString(p, &ps); err != nil {
			return Claim{}, fmt.Errorf("entry %d: path: want a string, got %s", d.n, describe(p))
		}
		abs, err := resolvePath(ps, d.storeDir)
		if err != nil {
			return Claim{}, fmt.Errorf("entry %d: path: %w", d.n, err)
		}
		if c, ok, err := d.claim(abs, fields); err != nil || ok {
			return c, err
		}
	}
}

// nextObject reads the object keyed by store path (Nix 2.19-2.32) and the
// versioned envelope {"version": N, "storeDir": ..., "info": {<basename>:
// ...}} of `nix path-info --json --json-format 2` (Nix >= 2.33). Nix sorts
// the keys, so "info" comes before "storeDir" and "version": those are
// checked when they come, and the entries read before them can only have
// been verified against this proxy's store dir (the fingerprint names it).
func (d *Decoder) nextObject() (Claim, error) {
	if !d.started {
		d.started = true
		if err := d.openDelim('{'); err != nil {
			return Claim{}, err
		}
	}
	for {
		d.allow()
		if !d.dec.More() {
			if d.inInfo {
				d.inInfo = false
				d.allow()
				if _, err := d.dec.Token(); err != nil { // the closing '}' of "info"
					return Claim{}, fmt.Errorf("info: %w", d.jsonErr(err, "info"))
				}
				continue
			}
			if err := d.closeTop(); err != nil {
				return Claim{}, err
			}
			if d.envelope && d.version != nil {
				if err := checkVersion(d.version); err != nil {
					return Claim{}, err
				}
			}
			return Claim{}, io.EOF
		}
		d.startEntry()
		tok, err := d.dec.Token()
		if err != nil {
			return Claim{}, fmt.Errorf("entry %d: %w", d.n, d.jsonErr(err, "the entry"))
		}
		key, ok := tok.(string)
		if !ok {
			return Claim{}, errors.New("invalid JSON: object key is not a string")
		}
		where := ""
		if d.inInfo {
			where = "info: "
		}
		dig := sha256.Sum256([]byte(where + key))
		if _, dup := d.seen[[16]byte(dig[:16])]; dup {
			return Claim{}, fmt.Errorf("%skey %q appears more than once", where, key)
		}
		d.seen[[16]byte(dig[:16])] = struct{}{}
		if !d.inInfo {
			switch key {
			case "info":
				if d.paths {
					return Claim{}, errors.New(`info: an object with an "info" member has no store paths beside it`)
				}
				d.envelope, d.inInfo = true, true
				d.n-- // not an entry
				tok, err := d.dec.Token()
				if err != nil {
					return Claim{}, fmt.Errorf("info: %w", d.jsonErr(err, "info"))
				}
				if tok != json.Delim('{') {
					return Claim{}, fmt.Errorf("info: want a JSON object, got %v", tok)
				}
				if d.version != nil {
					if err := checkVersion(d.version); err != nil {
						return Claim{}, err
					}
				}
				continue
			case "version", "storeDir":
				// Metadata some Nix versions put next to the paths, not a path.
				d.n--
				var raw json.RawMessage
				if err := d.dec.Decode(&raw); err != nil {
					return Claim{}, fmt.Errorf("%s: %w", key, d.jsonErr(err, key))
				}
				if key == "storeDir" {
					if err := checkStoreDirField(raw, d.storeDir); err != nil {
						return Claim{}, err
					}
					continue
				}
				d.version = raw
				if d.envelope {
					if err := checkVersion(raw); err != nil {
						return Claim{}, err
					}
				}
				continue
			}
			if d.envelope {
				return Claim{}, fmt.Errorf(`entry %d: key %q beside "info"`, d.n, key)
			}
			d.paths = true
		}
		var raw json.RawMessage
		if err := d.dec.Decode(&raw); err != nil {
			return Claim{}, fmt.Errorf("entry %d (key %q): %w", d.n, key, d.jsonErr(err, "the entry"))
		}
		abs, err := resolvePath(key, d.storeDir)
		if err != nil {
			return Claim{}, fmt.Errorf("entry %d: key: %w", d.n, err)
		}
		if isNull(raw) {
			d.Invalid = append(d.Invalid, abs)
			continue
		}
		fields, err := entryFields(raw)
		if err != nil {
			return Claim{}, fmt.Errorf("entry %d (%s): %w", d.n, abs, err)
		}
		if p, ok := fields["path"]; ok {
			var ps string
			if unmarshalString(p, &ps) != nil {
				return Claim{}, fmt.Errorf("entry %d (%s): path: want a string, got %s", d.n, abs, describe(p))
			}
			if pa, err := resolvePath(ps, d.storeDir); err != nil || pa != abs {
				return Claim{}, fmt.Errorf("entry %d (%s): path: %q disagrees with the key", d.n, abs, ps)
			}
		}
		if c, ok, err := d.claim(abs, fields); err != nil || ok {
			return c, err
		}
	}
}

// claim is the claim of one entry of either JSON form, or, for a path the
// rebuilder's store says is not valid, nothing (ok false; the path goes to
// Invalid).
func (d *Decoder) claim(abs string, fields map[string]json.RawMessage) (c Claim, ok bool, err error) {
	c, valid, err := entryClaim(abs, fields, d.storeDir)
	if err != nil {
		return Claim{}, false, fmt.Errorf("entry %d (%s): %w", d.n, abs, err)
	}
	if !valid {
		d.Invalid = append(d.Invalid, abs)
		return Claim{}, false, nil
	}
	return c, true, nil
}

func checkVersion(raw json.RawMessage) error {
	v, err := parseUint(raw)
	if err != nil {
		return fmt.Errorf("version: %w", err)
	}
	if v < 1 || v > 3 {
		return fmt.Errorf("version: path-info JSON version %d is not supported (want 1, 2 or 3)", v)
	}
	return nil
}

// nextNarinfo reads narinfo blocks separated by blank lines.
func (d *Decoder) nextNarinfo() (Claim, error) {
	var block bytes.Buffer
	startLine := 0
	for {
		line, err := d.readLine(d.maxEntry - block.Len())
		if err != nil && err != io.EOF {
			return Claim{}, fmt.Errorf("narinfo %d (starting at line %d): %w", d.n+1, max(startLine, d.lineNo), d.tooLarge(err, "the block"))
		}
		eof := err == io.EOF
		if line != nil {
			d.lineNo++
		}
		if line == nil || len(bytes.TrimSpace(line)) == 0 {
			if block.Len() > 0 {
				d.n++
				return d.narinfoClaim(block.Bytes(), startLine)
			}
			if eof {
				return Claim{}, io.EOF
			}
			continue
		}
		if block.Len() == 0 {
			startLine = d.lineNo
		}
		block.Write(line)
		block.WriteByte('\n')
		if eof {
			d.n++
			return d.narinfoClaim(block.Bytes(), startLine)
		}
	}
}

// readLine returns the next line without its "\n" (nil at the end of the
// input), failing when it is longer than limit.
func (d *Decoder) readLine(limit int) ([]byte, error) {
	var line []byte
	if len(d.leftover) > 0 {
		line, d.leftover = append(line, d.leftover...), nil
	}
	for {
		frag, err := d.br.ReadSlice('\n')
		line = append(line, frag...)
		if len(line) > limit {
			return nil, errEntryTooLarge
		}
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case err == bufio.ErrBufferFull:
			continue
		case err == io.EOF:
			if len(line) == 0 {
				return nil, io.EOF
			}
			return line, io.EOF
		default:
			return nil, err
		}
	}
}

func (d *Decoder) narinfoClaim(block []byte, startLine int) (Claim, error) {
	ni, err := narinfo.Parse(block, d.storeDir)
	if err != nil {
		return Claim{}, fmt.Errorf("narinfo %d (starting at line %d): %w", d.n, startLine, err)
	}
	c, err := claimFromNarinfo(ni)
	if err != nil {
		return Claim{}, fmt.Errorf("narinfo %d (%s): %w", d.n, ni.StorePath, err)
	}
	return c, nil
}
