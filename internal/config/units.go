package config

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
	"time"
)

// day is the unit behind the "d" suffix. Operators write expiries and
// retention in days ("30d"); the standard library stops at hours.
const day = 24 * time.Hour

// Duration is a time.Duration that reads and writes as a TOML string such as
// "30s", "12h" or "30d" (d = 24h).
type Duration struct{ time.Duration }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(text []byte) error {
	v, err := ParseDuration(string(text))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalText implements encoding.TextMarshaler. The output always parses back
// to the same value with ParseDuration.
func (d Duration) MarshalText() ([]byte, error) {
	return []byte(FormatDuration(d.Duration)), nil
}

// String renders the duration the way a config file would spell it.
func (d Duration) String() string { return FormatDuration(d.Duration) }

// ParseDuration parses Go duration syntax extended with a leading day count:
// "90s", "12h", "30d", "1d12h". Negative durations are refused: every
// duration in cacheproxy is a timeout or a lifetime, and a negative one is
// always a typo.
func ParseDuration(s string) (time.Duration, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, errors.New("empty duration")
	}
	if strings.HasPrefix(in, "-") {
		return 0, fmt.Errorf("duration %q: must not be negative", s)
	}
	in = strings.TrimPrefix(in, "+")

	var total time.Duration
	if i := strings.IndexByte(in, 'd'); i >= 0 {
		days, err := strconv.ParseFloat(in[:i], 64)
		if err != nil || i == 0 || math.IsNaN(days) || math.IsInf(days, 0) {
			return 0, fmt.Errorf("duration %q: bad day count %q", s, in[:i])
		}
		if days*float64(day) > float64(math.MaxInt64) {
			return 0, fmt.Errorf("duration %q: too large", s)
		}
		total = time.Duration(days * float64(day))
		in = in[i+1:]
		if in == "" {
			return total, nil
		}
	}
	rest, err := time.ParseDuration(in)
	if err != nil {
		return 0, fmt.Errorf("duration %q: %w (use units ns, us, ms, s, m, h or d)", s, err)
	}
	if rest < 0 {
		return 0, fmt.Errorf("duration %q: must not be negative", s)
	}
	if total > math.MaxInt64-rest {
		return 0, fmt.Errorf("duration %q: too large", s)
	}
	return total + rest, nil
}

// FormatDuration renders d in the shortest form ParseDuration reads back:
// whole days as "30d", otherwise Go's syntax without trailing zero units
// ("1h30m" rather than "1h30m0s").
func FormatDuration(d time.Duration) string {
	if d > 0 && d%day == 0 {
		return strconv.FormatInt(int64(d/day), 10) + "d"
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// Size is a byte count that reads and writes as a TOML string such as
// "100GiB", "500MB" or "1024". A bare TOML integer is read as bytes.
type Size uint64

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(text []byte) error {
	v, err := ParseSize(string(text))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// MarshalText implements encoding.TextMarshaler. The output always parses back
// to the same value with ParseSize.
func (s Size) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// String renders the size with the largest unit that divides it exactly,
// preferring binary units (what disks and the cache limit are thought in).
func (s Size) String() string {
	for _, u := range sizeUnits {
		if u.mult > 1 && uint64(s) >= u.mult && uint64(s)%u.mult == 0 {
			return strconv.FormatUint(uint64(s)/u.mult, 10) + u.name
		}
	}
	return strconv.FormatUint(uint64(s), 10)
}

type sizeUnit struct {
	name string
	mult uint64
}

// sizeUnits is ordered so that String picks the largest exact unit, binary
// before decimal. It is never modified.
var sizeUnits = [...]sizeUnit{
	{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
	{"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3},
	{"B", 1},
}

// ParseSize parses a byte count: a number (fractions allowed with a unit)
// followed by an optional unit. KiB/MiB/GiB/TiB are powers of 1024,
// KB/MB/GB/TB powers of 1000, B or no unit means bytes. Units are matched
// case-insensitively because "100gib" has only one sensible meaning; bare
// "K"/"M"/"G" are refused because they are ambiguous between the two systems.
func ParseSize(s string) (Size, error) {
	in := strings.TrimSpace(s)
	i := 0
	for i < len(in) && (in[i] >= '0' && in[i] <= '9' || in[i] == '.') {
		i++
	}
	num, unit := in[:i], strings.TrimSpace(in[i:])
	if num == "" {
		return 0, fmt.Errorf("size %q: expected a number such as \"100GiB\" or \"500MB\"", s)
	}
	mult := uint64(0)
	if unit == "" {
		mult = 1
	}
	for _, u := range sizeUnits {
		if strings.EqualFold(unit, u.name) {
			mult = u.mult
		}
	}
	if mult == 0 {
		return 0, fmt.Errorf("size %q: unknown unit %q (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)", s, unit)
	}
	// big.Rat keeps "1.5GiB" and very large byte counts exact, which a
	// float64 would not.
	r, ok := new(big.Rat).SetString(num)
	if !ok {
		return 0, fmt.Errorf("size %q: bad number %q", s, num)
	}
	r.Mul(r, new(big.Rat).SetInt(new(big.Int).SetUint64(mult)))
	if !r.IsInt() {
		return 0, fmt.Errorf("size %q: not a whole number of bytes", s)
	}
	n := r.Num()
	if !n.IsUint64() {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return Size(n.Uint64()), nil
}
