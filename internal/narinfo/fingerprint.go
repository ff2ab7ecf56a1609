package narinfo

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Fingerprint is Nix's ValidPathInfo::fingerprint, the exact string that narinfo
// and attestation signatures cover:
//
//	1;<storePath>;<narHash as sha256:nix32>;<narSize>;<references as absolute paths, sorted, comma-joined>
//
// refs are basenames. Nix keeps references in a std::set, so they are sorted and
// de-duplicated here whatever order the caller has them in (go-nix does not sort,
// which breaks signatures over paths whose narinfo lists references unsorted).
// narSize must be non-zero, as Nix refuses to fingerprint a path of unknown size.
func Fingerprint(storeDir, storePath string, narHash SHA256, narSize uint64, refs []string) (string, error) {
	if _, err := ParseStorePath(storePath, storeDir); err != nil {
		return "", fmt.Errorf("fingerprint: %w", err)
	}
	if narHash.IsZero() {
		return "", errors.New("fingerprint: NarHash is missing")
	}
	if narSize == 0 {
		return "", errors.New("fingerprint: NarSize is zero (unknown)")
	}
	for _, r := range refs {
		if _, _, err := ParseBaseName(r); err != nil {
			return "", fmt.Errorf("fingerprint: reference: %w", err)
		}
	}
	// Sorting basenames sorts the absolute paths (one store dir prefix).
	// Claims and narinfos mostly come sorted already: then no copy.
	if !sortedUnique(refs) {
		refs = dedupSorted(slices.Sorted(slices.Values(refs)))
	}
	hash := narHash.String()
	size := strconv.FormatUint(narSize, 10)
	// One allocation: an import builds one fingerprint per claim.
	n := len("1;;;;") + len(storePath) + len(hash) + len(size)
	for _, r := range refs {
		n += len(storeDir) + len("/,") + len(r)
	}
	var b strings.Builder
	b.Grow(n)
	b.WriteString("1;")
	b.WriteString(storePath)
	b.WriteByte(';')
	b.WriteString(hash)
	b.WriteByte(';')
	b.WriteString(size)
	b.WriteByte(';')
	for i, r := range refs {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(storeDir)
		b.WriteByte('/')
		b.WriteString(r)
	}
	return b.String(), nil
}

// sortedUnique reports whether s is sorted without repeats.
func sortedUnique(s []string) bool {
	for i := 1; i < len(s); i++ {
		if s[i-1] >= s[i] {
			return false
		}
	}
	return true
}

// Fingerprint returns the fingerprint of n (see the package-level Fingerprint).
func (n *NarInfo) Fingerprint(storeDir string) (string, error) {
	return Fingerprint(storeDir, n.StorePath, n.NarHash, n.NarSize, n.References)
}

// absRefs validates basenames and returns them as sorted, de-duplicated absolute
// paths. Sorting the absolute paths equals Nix's order (StorePath compares
// basenames) because they share the store dir prefix.
func absRefs(storeDir string, refs []string) ([]string, error) {
	out := make([]string, 0, len(refs))
	for _, r := range refs {
		if _, _, err := ParseBaseName(r); err != nil {
			return nil, fmt.Errorf("reference: %w", err)
		}
		out = append(out, storeDir+"/"+r)
	}
	sort.Strings(out)
	return dedupSorted(out), nil
}

func dedupSorted(s []string) []string {
	if len(s) < 2 {
		return s
	}
	j := 1
	for i := 1; i < len(s); i++ {
		if s[i] != s[j-1] {
			s[j] = s[i]
			j++
		}
	}
	return s[:j]
}
