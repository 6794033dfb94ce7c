package iothub

import "testing"

func TestStatusErrorTemporary(t *testing.T) {
	for status, want := range map[int]bool{400: false, 401: false, 404: false, 408: true, 412: false, 413: false,
		429: true, 500: true, 503: true, 504: true} {
		if got := (&StatusError{Status: status}).Temporary(); got != want {
			t.Errorf("StatusError{%d}.Temporary() = %v, want %v", status, got, want)
		}
	}
	e := &StatusError{Status: 429, Body: []byte(`{"errorCode":429001}`)}
	if got := e.Error(); got != `iothub: hub answered 429: {"errorCode":429001}` {
		t.Errorf("Error() = %q", got)
	}
}

func TestDecodeObject(t *testing.T) {
	doc, err := DecodeObject([]byte(`{"a":9007199254740993,"b":{"c":null}}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := doc["a"].(interface{ String() string }).String(); got != "9007199254740993" {
		t.Errorf("a = %s, want the integer unrounded", got)
	}
	for in, want := range map[string]string{
		`[1]`:   "not a JSON object: array",
		`null`:  "not a JSON object: null",
		`{} {}`: "trailing data after the JSON object",
		`{"a":`: "malformed JSON: unexpected EOF",
		`"x"`:   "not a JSON object: string",
	} {
		if _, err := DecodeObject([]byte(in)); err == nil || err.Error() != want {
			t.Errorf("DecodeObject(%s) = %v, want %q", in, err, want)
		}
	}
}
