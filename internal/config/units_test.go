package config

import (
	"testing"
	"time"
)

func TestParseDuration(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"90s", 90 * time.Second},
		{"12h", 12 * time.Hour},
		{"30d", 30 * 24 * time.Hour},
		{"1d12h", 36 * time.Hour},
		{"1.5d", 36 * time.Hour},
		{"250ms", 250 * time.Millisecond},
		{" 5m ", 5 * time.Minute},
		{"0s", 0},
	} {
		got, err := ParseDuration(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "30", "d", "-5m", "1d-5h", "30x", "1e400d", "300000000d", "abcd"} {
		if got, err := ParseDuration(bad); err == nil {
			t.Errorf("ParseDuration(%q) = %v, want error", bad, got)
		}
	}
}

func TestFormatDurationRoundTrip(t *testing.T) {
	for _, d := range []time.Duration{0, time.Nanosecond, 90 * time.Second, time.Hour, 90 * time.Minute, 24 * time.Hour, 36 * time.Hour, 30 * 24 * time.Hour, 1500 * time.Millisecond} {
		s := FormatDuration(d)
		back, err := ParseDuration(s)
		if err != nil || back != d {
			t.Errorf("%v -> %q -> %v, %v", d, s, back, err)
		}
	}
	if s := FormatDuration(30 * 24 * time.Hour); s != "30d" {
		t.Errorf("30 days formats as %q", s)
	}
	if s := FormatDuration(time.Hour); s != "1h" {
		t.Errorf("1h formats as %q", s)
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Size
	}{
		{"1024", 1024},
		{"0", 0},
		{"100GiB", 100 << 30},
		{"100 GiB", 100 << 30},
		{"100gib", 100 << 30},
		{"500MB", 500_000_000},
		{"1KiB", 1024},
		{"1KB", 1000},
		{"2TiB", 2 << 40},
		{"3TB", 3e12},
		{"1.5GiB", 3 << 29},
		{"7B", 7},
	} {
		got, err := ParseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %v, %v; want %d", tc.in, uint64(got), err, uint64(tc.want))
		}
	}
	for _, bad := range []string{"", "GiB", "10K", "10 parsecs", "1.5", "-1", "1.2.3MB", "99999999999TiB", "18446744073709551616"} {
		if got, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) = %d, want error", bad, uint64(got))
		}
	}
}

func TestSizeStringRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		in   Size
		want string
	}{
		{100 << 30, "100GiB"},
		{500_000_000, "500MB"},
		{1536, "1536"}, // 1.5KiB is not exact in any unit, so plain bytes
		{3000, "3KB"},
	} {
		if got := tc.in.String(); got != tc.want {
			t.Errorf("Size(%d).String() = %q, want %q", uint64(tc.in), got, tc.want)
		}
	}
	for _, s := range []Size{0, 1, 1023, 1024, 1536, 1000, 100 << 30, 500_000_000, 1<<64 - 1} {
		back, err := ParseSize(s.String())
		if err != nil || back != s {
			t.Errorf("%d -> %q -> %d, %v", uint64(s), s.String(), uint64(back), err)
		}
	}
}
