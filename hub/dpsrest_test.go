package hub

import (
	"encoding/json"
	"net/http"
	"testing"

	"github.com/gwagent/gwagent/iothub/dps"
)

// TestDPSEnrollmentAPI runs the same service API sequence against
// individual enrollments and enrollment groups, which share one
// implementation: validation, create, read, If-Match on replace and delete,
// attestation, query order and 404s.
func TestDPSEnrollmentAPI(t *testing.T) {
	h := startHub(t)
	svc := newDPSService(t, h)
	for _, kind := range []struct{ path, idField, what string }{
		{"/enrollments/", "registrationId", "Enrollment"},
		{"/enrollmentGroups/", "enrollmentGroupId", "Enrollment group"},
	} {
		t.Run(kind.what, func(t *testing.T) {
			svc.t = t
			att := map[string]any{"type": "symmetricKey"}
			body := func(id, status string) map[string]any {
				return map[string]any{kind.idField: id, "attestation": att, "provisioningStatus": status}
			}
			var rec map[string]any
			decode := func(b []byte) map[string]any {
				t.Helper()
				var m map[string]any
				if err := json.Unmarshal(b, &m); err != nil {
					t.Fatalf("%s: %v", b, err)
				}
				return m
			}
			errorCode := func(b []byte) float64 { code, _ := decode(b)["errorCode"].(float64); return code }

			for _, c := range []struct {
				name, id string
				body     any
			}{
				{"invalid id", "Not Valid", body("", "enabled")},
				{"body id differs", "gw-b", body("gw-other", "enabled")},
				{"unknown status", "gw-b", body("gw-b", "paused")},
				{"no attestation type", "gw-b", map[string]any{}},
			} {
				if code, b, _ := svc.do("PUT", kind.path+c.id, c.body); code != http.StatusBadRequest || errorCode(b) != dps.CodeBadRequest {
					t.Errorf("PUT with %s: %d %s, want 400 %d", c.name, code, b, dps.CodeBadRequest)
				}
			}

			code, b, _ := svc.do("PUT", kind.path+"gw-b", body("", ""))
			if code != http.StatusOK {
				t.Fatalf("PUT: %d %s", code, b)
			}
			rec = decode(b)
			etag, _ := rec["etag"].(string)
			keys, _ := rec["attestation"].(map[string]any)["symmetricKey"].(map[string]any)
			if rec[kind.idField] != "gw-b" || etag == "" || rec["provisioningStatus"] != "enabled" || keys["primaryKey"] == "" || keys["secondaryKey"] == "" {
				t.Fatalf("PUT answered %s", b)
			}
			if code, b, _ := svc.do("GET", kind.path+"gw-b", nil); code != http.StatusOK || decode(b)["etag"] != etag {
				t.Fatalf("GET: %d %s, want etag %s", code, b, etag)
			}
			if code, b, _ := svc.do("PUT", kind.path+"gw-b", body("gw-b", "disabled"), "If-Match", `"stale"`); code != http.StatusPreconditionFailed || errorCode(b) != dps.CodePreconditionFailed {
				t.Fatalf("PUT with a stale If-Match: %d %s, want 412", code, b)
			}
			code, b, _ = svc.do("PUT", kind.path+"gw-b", body("gw-b", "disabled"), "If-Match", etag)
			replaced := decode(b)
			if code != http.StatusOK || replaced["etag"] == etag || replaced["provisioningStatus"] != "disabled" || replaced["createdDateTimeUtc"] != rec["createdDateTimeUtc"] {
				t.Fatalf("PUT with If-Match: %d %s (before: %v)", code, b, rec)
			}
			etag = replaced["etag"].(string)
			if code, b, _ := svc.do("POST", kind.path+"gw-b/attestationmechanism", nil); code != http.StatusOK || decode(b)["type"] != "symmetricKey" {
				t.Fatalf("attestation: %d %s", code, b)
			}
			if code, b, _ := svc.do("PUT", kind.path+"gw-a", body("", "")); code != http.StatusOK {
				t.Fatalf("PUT gw-a: %d %s", code, b)
			}
			code, b, resp := svc.do("POST", kind.path+"query", map[string]any{"query": "*"})
			var list []map[string]any
			if err := json.Unmarshal(b, &list); err != nil || code != http.StatusOK || resp.Header.Get("x-ms-item-type") != "Enrollment" ||
				len(list) != 2 || list[0][kind.idField] != "gw-a" || list[1][kind.idField] != "gw-b" {
				t.Fatalf("query: %d %s (item type %q, %v)", code, b, resp.Header.Get("x-ms-item-type"), err)
			}
			if code, b, _ := svc.do("DELETE", kind.path+"gw-b", nil, "If-Match", `"stale"`); code != http.StatusPreconditionFailed {
				t.Fatalf("DELETE with a stale If-Match: %d %s, want 412", code, b)
			}
			if code, b, _ := svc.do("DELETE", kind.path+"gw-b", nil, "If-Match", etag); code != http.StatusNoContent {
				t.Fatalf("DELETE: %d %s", code, b)
			}
			for _, p := range []struct{ method, path string }{
				{"GET", kind.path + "gw-b"}, {"DELETE", kind.path + "gw-b"}, {"POST", kind.path + "gw-b/attestationmechanism"},
			} {
				if code, b, _ := svc.do(p.method, p.path, nil); code != http.StatusNotFound || errorCode(b) != dps.CodeEnrollmentNotFound {
					t.Errorf("%s %s after the delete: %d %s, want 404 %d", p.method, p.path, code, b, dps.CodeEnrollmentNotFound)
				}
			}
		})
	}
}
