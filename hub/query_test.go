package hub

import (
	"errors"
	"testing"
)

func TestParseQuery(t *testing.T) {
	doc := decodeJSON(t, []byte(`{"deviceId":"gw-01","status":"enabled","tags":{"site":"lab","n":3,"on":true},
		"properties":{"reported":{"firmware":{"status":"completed","percent":100}}}}`))
	tests := []struct {
		q     string
		canon string
		match bool
	}{
		{"SELECT * FROM devices", "SELECT * FROM devices", true},
		{"select * from DEVICES where tags.site = 'lab'", "SELECT * FROM devices WHERE tags.site = 'lab'", true},
		{`SELECT * FROM devices WHERE tags.site = "field"`, "SELECT * FROM devices WHERE tags.site = 'field'", false},
		{"SELECT * FROM devices WHERE tags.n >= 3 AND tags.n < 4", "SELECT * FROM devices WHERE (tags.n >= 3 AND tags.n < 4)", true},
		{"SELECT * FROM devices WHERE 2 < tags.n", "SELECT * FROM devices WHERE tags.n > 2", true},
		{"SELECT * FROM devices WHERE tags.n <> 3", "SELECT * FROM devices WHERE tags.n != 3", false},
		{"SELECT * FROM devices WHERE tags.on = true", "SELECT * FROM devices WHERE tags.on = true", true},
		{"SELECT * FROM devices WHERE tags.site = 3", "SELECT * FROM devices WHERE tags.site = 3", false},
		{"SELECT * FROM devices WHERE tags.missing != 'x'", "SELECT * FROM devices WHERE tags.missing != 'x'", false},
		{"SELECT * FROM devices WHERE is_defined(properties.reported.firmware) AND NOT is_defined(tags.x)",
			"SELECT * FROM devices WHERE (is_defined(properties.reported.firmware) AND NOT is_defined(tags.x))", true},
		{"SELECT * FROM devices WHERE (tags.site = 'x' OR tags.site = 'lab') AND properties.reported.firmware.percent = 100",
			"SELECT * FROM devices WHERE ((tags.site = 'x' OR tags.site = 'lab') AND properties.reported.firmware.percent = 100)", true},
		{"SELECT TOP 10 * FROM devices WHERE deviceId = 'it''s'", "SELECT TOP 10 * FROM devices WHERE deviceId = 'it''s'", false},
		{"SELECT * FROM devices WHERE tags = 'lab'", "SELECT * FROM devices WHERE tags = 'lab'", false},
		{"SELECT * FROM devices WHERE deviceId IN ['gw-02','gw-01']", "SELECT * FROM devices WHERE deviceId IN ['gw-02', 'gw-01']", true},
		{"SELECT * FROM devices WHERE deviceId in ['gw-02']", "SELECT * FROM devices WHERE deviceId IN ['gw-02']", false},
		{"SELECT * FROM devices WHERE tags.n IN [1, 3] AND tags.site NIN ['x', 'y']",
			"SELECT * FROM devices WHERE (tags.n IN [1, 3] AND tags.site NIN ['x', 'y'])", true},
		{"SELECT * FROM devices WHERE tags.site NIN ['lab']", "SELECT * FROM devices WHERE tags.site NIN ['lab']", false},
		{"SELECT * FROM devices WHERE tags.missing NIN ['lab']", "SELECT * FROM devices WHERE tags.missing NIN ['lab']", false},
	}
	for _, tc := range tests {
		t.Run(tc.q, func(t *testing.T) {
			q, err := ParseQuery(tc.q)
			if err != nil {
				t.Fatal(err)
			}
			if q.String() != tc.canon {
				t.Fatalf("canonical %q, want %q", q.String(), tc.canon)
			}
			if q.Match(doc) != tc.match {
				t.Fatalf("match = %v, want %v", !tc.match, tc.match)
			}
		})
	}
	for _, bad := range []string{
		"", "SELECT", "SELECT deviceId FROM devices", "SELECT * FROM devices.modules", "SELECT * FROM jobs",
		"SELECT * FROM devices WHERE", "SELECT * FROM devices WHERE tags.a = ", "SELECT * FROM devices WHERE tags.a = 'x",
		"SELECT * FROM devices WHERE (tags.a = 1", "SELECT * FROM devices WHERE tags.a ! 1", "SELECT * FROM devices WHERE a = b",
		"SELECT TOP 0 * FROM devices", "SELECT * FROM devices extra", "SELECT * FROM devices WHERE and = 1",
		"SELECT * FROM devices WHERE deviceId IN []", "SELECT * FROM devices WHERE deviceId IN ['a'", "SELECT * FROM devices WHERE deviceId IN 'a'",
		"SELECT * FROM devices WHERE deviceId IN ['a' 'b']", "SELECT * FROM devices WHERE in = 1",
	} {
		if _, err := ParseQuery(bad); !errors.Is(err, ErrQuery) {
			t.Errorf("ParseQuery(%q) = %v, want ErrQuery", bad, err)
		}
	}
}

// FuzzParseQuery: the parser never panics, and a parsed query prints to a
// canonical form that parses back to the same form.
func FuzzParseQuery(f *testing.F) {
	for _, s := range []string{
		"SELECT * FROM devices",
		"SELECT TOP 5 * FROM devices WHERE tags.a = 'x' AND (b.c != 1.5e3 OR NOT is_defined(d))",
		"SELECT * FROM devices WHERE 'a' <= x.y OR z = null OR w = false",
		"select * from devices where ((((a = -1))))",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		q, err := ParseQuery(s)
		if err != nil {
			if !errors.Is(err, ErrQuery) {
				t.Fatalf("error %v does not wrap ErrQuery", err)
			}
			return
		}
		c := q.String()
		q2, err := ParseQuery(c)
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", c, s, err)
		}
		if q2.String() != c {
			t.Fatalf("canonical form not stable: %q -> %q", c, q2.String())
		}
	})
}
