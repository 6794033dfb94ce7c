package service

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// NewDPS builds a Client for the service API of a Device Provisioning
// Service from its connection string (policy provisioningserviceowner or
// one with enrollment rights). Only the DPS calls below make sense on it.
func NewDPS(cs iothub.ConnectionString, opts Options) (*Client, error) {
	c, err := New(cs, opts)
	if err != nil {
		return nil, err
	}
	c.apiVer = dps.ServiceAPIVersion
	return c, nil
}

func checkRegID(what, id string) error {
	if !dps.ValidRegistrationID(id) {
		return fmt.Errorf("%w: %s %q (1-128 lower-case letters, digits and -._:)", ErrInvalid, what, id)
	}
	return nil
}

// PutEnrollmentGroup creates or replaces an enrollment group; etag "" or
// "*" overwrites whatever is there.
func (c *Client) PutEnrollmentGroup(ctx context.Context, g dps.EnrollmentGroup, etag string) (dps.EnrollmentGroup, error) {
	if err := checkRegID("enrollment group id", g.EnrollmentGroupID); err != nil {
		return dps.EnrollmentGroup{}, err
	}
	b, err := json.Marshal(g)
	if err != nil {
		return dps.EnrollmentGroup{}, err
	}
	var out dps.EnrollmentGroup
	_, err = c.call(ctx, request{method: http.MethodPut, path: "/enrollmentGroups/" + url.PathEscape(g.EnrollmentGroupID),
		body: b, header: ifMatch(etag), idempotent: true}, &out)
	return out, err
}

// EnrollmentGroup reads an enrollment group.
func (c *Client) EnrollmentGroup(ctx context.Context, id string) (dps.EnrollmentGroup, error) {
	var out dps.EnrollmentGroup
	_, err := c.call(ctx, request{method: http.MethodGet, path: "/enrollmentGroups/" + url.PathEscape(id), idempotent: true}, &out)
	return out, err
}

// DeleteEnrollmentGroup deletes an enrollment group.
func (c *Client) DeleteEnrollmentGroup(ctx context.Context, id string) error {
	_, err := c.call(ctx, request{method: http.MethodDelete, path: "/enrollmentGroups/" + url.PathEscape(id), idempotent: true}, nil)
	return err
}

// EnrollmentGroups lists the enrollment groups (first page of the query).
func (c *Client) EnrollmentGroups(ctx context.Context) ([]dps.EnrollmentGroup, error) {
	b, _ := json.Marshal(dps.QuerySpecification{Query: "*"})
	var out []dps.EnrollmentGroup
	_, err := c.call(ctx, request{method: http.MethodPost, path: "/enrollmentGroups/query", body: b, idempotent: true}, &out)
	return out, err
}

// PutEnrollment creates or replaces an individual enrollment.
func (c *Client) PutEnrollment(ctx context.Context, e dps.IndividualEnrollment, etag string) (dps.IndividualEnrollment, error) {
	if err := checkRegID("registration id", e.RegistrationID); err != nil {
		return dps.IndividualEnrollment{}, err
	}
	b, err := json.Marshal(e)
	if err != nil {
		return dps.IndividualEnrollment{}, err
	}
	var out dps.IndividualEnrollment
	_, err = c.call(ctx, request{method: http.MethodPut, path: "/enrollments/" + url.PathEscape(e.RegistrationID),
		body: b, header: ifMatch(etag), idempotent: true}, &out)
	return out, err
}

// Enrollment reads an individual enrollment.
func (c *Client) Enrollment(ctx context.Context, id string) (dps.IndividualEnrollment, error) {
	var out dps.IndividualEnrollment
	_, err := c.call(ctx, request{method: http.MethodGet, path: "/enrollments/" + url.PathEscape(id), idempotent: true}, &out)
	return out, err
}

// DeleteEnrollment deletes an individual enrollment.
func (c *Client) DeleteEnrollment(ctx context.Context, id string) error {
	_, err := c.call(ctx, request{method: http.MethodDelete, path: "/enrollments/" + url.PathEscape(id), idempotent: true}, nil)
	return err
}

// Enrollments lists the individual enrollments (first page of the query).
func (c *Client) Enrollments(ctx context.Context) ([]dps.IndividualEnrollment, error) {
	b, _ := json.Marshal(dps.QuerySpecification{Query: "*"})
	var out []dps.IndividualEnrollment
	_, err := c.call(ctx, request{method: http.MethodPost, path: "/enrollments/query", body: b, idempotent: true}, &out)
	return out, err
}

// Registration reads the registration state of a registration id.
func (c *Client) Registration(ctx context.Context, id string) (dps.RegistrationState, error) {
	var out dps.RegistrationState
	_, err := c.call(ctx, request{method: http.MethodGet, path: "/registrations/" + url.PathEscape(id), idempotent: true}, &out)
	return out, err
}

// GroupRegistrations lists the registration states of an enrollment group.
func (c *Client) GroupRegistrations(ctx context.Context, groupID string) ([]dps.RegistrationState, error) {
	b, _ := json.Marshal(dps.QuerySpecification{Query: "*"})
	var out []dps.RegistrationState
	_, err := c.call(ctx, request{method: http.MethodPost, path: "/registrations/" + url.PathEscape(groupID) + "/query", body: b, idempotent: true}, &out)
	return out, err
}
