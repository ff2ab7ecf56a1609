package narinfo

import "fmt"

// nix32Alphabet is Nix's base-32 alphabet: digits and lower-case letters without
// e, o, u and t (to avoid accidental words in store paths).
const nix32Alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

// nix32Index maps a byte to its digit value, or -1. Built by a function rather than
// at init time so the package has no mutable globals.
func nix32Digit(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'z':
		for i := 10; i < len(nix32Alphabet); i++ {
			if nix32Alphabet[i] == c {
				return i
			}
		}
	}
	return -1
}

// nix32EncodedLen is the length of the Nix base-32 form of n bytes.
func nix32EncodedLen(n int) int {
	if n == 0 {
		return 0
	}
	return (n*8-1)/5 + 1
}

// nix32Encode renders bytes in Nix base-32. Nix walks the digest from its last
// bit group to its first, so the result is not RFC 4648 base32 of any byte order.
func nix32Encode(b []byte) string {
	l := nix32EncodedLen(len(b))
	out := make([]byte, 0, l)
	for n := l - 1; n >= 0; n-- {
		bit := n * 5
		i := bit / 8
		j := uint(bit % 8)
		c := b[i] >> j
		if i+1 < len(b) {
			c |= b[i+1] << (8 - j)
		}
		out = append(out, nix32Alphabet[c&0x1f])
	}
	return string(out)
}

// nix32Decode decodes s into exactly size bytes. It rejects bits set beyond size
// (as Nix does), so every digest has exactly one accepted spelling.
func nix32Decode(s string, size int) ([]byte, error) {
	if len(s) != nix32EncodedLen(size) {
		return nil, fmt.Errorf("nix32 string has length %d, want %d", len(s), nix32EncodedLen(size))
	}
	out := make([]byte, size)
	for n := 0; n < len(s); n++ {
		c := s[len(s)-n-1]
		d := nix32Digit(c)
		if d < 0 {
			return nil, fmt.Errorf("invalid nix32 character %q", c)
		}
		bit := n * 5
		i := bit / 8
		j := uint(bit % 8)
		out[i] |= byte(d << j)
		carry := byte(d >> (8 - j))
		if i+1 < size {
			out[i+1] |= carry
		} else if carry != 0 {
			return nil, fmt.Errorf("nix32 string %q has bits beyond a %d-byte digest", s, size)
		}
	}
	return out, nil
}
