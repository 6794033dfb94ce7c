package service

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"

	"github.com/gwagent/gwagent/iothub"
)

func devicePath(id string) string { return "/devices/" + url.PathEscape(id) }

func checkID(id string) error {
	if !iothub.ValidDeviceID(id) {
		return fmt.Errorf("%w: device id %q (1-128 ASCII letters, digits and -:.+%%_#*?!(),=@;$')", ErrInvalid, id)
	}
	return nil
}

// NewKey returns a random 256-bit SAS key, base64-encoded as IoT Hub keys are.
func NewKey() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("service: generating a key: %w", err)
	}
	return base64.StdEncoding.EncodeToString(b), nil
}

// CreateDevice registers a SAS device with fresh random keys. The keys are
// made here rather than left to the hub so the result does not depend on a
// hub generating missing keys.
func (c *Client) CreateDevice(ctx context.Context, id string) (iothub.Device, error) {
	primary, secondary, err := newKeyPair()
	if err != nil {
		return iothub.Device{}, err
	}
	return c.CreateDeviceWithKeys(ctx, id, primary, secondary)
}

// newKeyPair returns a primary and a secondary key from NewKey.
func newKeyPair() (primary, secondary string, err error) {
	if primary, err = NewKey(); err != nil {
		return "", "", err
	}
	if secondary, err = NewKey(); err != nil {
		return "", "", err
	}
	return primary, secondary, nil
}

// CreateDeviceWithKeys registers a SAS device with the given base64 keys.
func (c *Client) CreateDeviceWithKeys(ctx context.Context, id, primaryKey, secondaryKey string) (iothub.Device, error) {
	for _, k := range []string{primaryKey, secondaryKey} {
		if b, err := base64.StdEncoding.DecodeString(k); err != nil || len(b) < 16 || len(b) > 64 {
			return iothub.Device{}, fmt.Errorf("%w: SAS keys must be base64 of 16 to 64 bytes", ErrInvalid)
		}
	}
	return c.putDevice(ctx, iothub.Device{DeviceID: id, Status: "enabled", Authentication: iothub.Authentication{
		Type:         iothub.AuthSAS,
		SymmetricKey: &iothub.SymmetricKey{PrimaryKey: primaryKey, SecondaryKey: secondaryKey},
	}})
}

// CreateDisabledDevice registers a device identity with status
// "disabled" and fresh random keys that are not returned: an identity no
// device can connect as, whose twin holds records (tags) of a tool.
// reason goes to statusReason (at most 128 characters at IoT Hub).
func (c *Client) CreateDisabledDevice(ctx context.Context, id, reason string) (iothub.Device, error) {
	primary, secondary, err := newKeyPair()
	if err != nil {
		return iothub.Device{}, err
	}
	d, err := c.putDevice(ctx, iothub.Device{DeviceID: id, Status: "disabled", StatusReason: reason, Authentication: iothub.Authentication{
		Type:         iothub.AuthSAS,
		SymmetricKey: &iothub.SymmetricKey{PrimaryKey: primary, SecondaryKey: secondary},
	}})
	d.Authentication.SymmetricKey = nil
	return d, err
}

// CreateX509Device registers a device authenticated by a self-signed
// certificate, given its SHA-1 or SHA-256 thumbprints (hex). The secondary
// thumbprint may be empty.
func (c *Client) CreateX509Device(ctx context.Context, id, primaryThumbprint, secondaryThumbprint string) (iothub.Device, error) {
	if primaryThumbprint == "" {
		return iothub.Device{}, fmt.Errorf("%w: an X.509 device needs a primary thumbprint", ErrInvalid)
	}
	return c.putDevice(ctx, iothub.Device{DeviceID: id, Status: "enabled", Authentication: iothub.Authentication{
		Type:           iothub.AuthSelfSigned,
		X509Thumbprint: &iothub.X509Thumbprint{PrimaryThumbprint: primaryThumbprint, SecondaryThumbprint: secondaryThumbprint},
	}})
}

func (c *Client) putDevice(ctx context.Context, d iothub.Device) (iothub.Device, error) {
	if err := checkID(d.DeviceID); err != nil {
		return iothub.Device{}, err
	}
	body, err := json.Marshal(d)
	if err != nil {
		return iothub.Device{}, fmt.Errorf("service: encoding device: %w", err)
	}
	// Without If-Match the PUT creates; a repeat after an ambiguous failure
	// would answer 409 DeviceAlreadyExists, so it is not idempotent.
	var out iothub.Device
	if _, err := c.call(ctx, request{method: http.MethodPut, path: devicePath(d.DeviceID), body: body}, &out); err != nil {
		return iothub.Device{}, fmt.Errorf("service: create device %s: %w", d.DeviceID, err)
	}
	return out, nil
}

// GetDevice reads a device identity, keys included.
func (c *Client) GetDevice(ctx context.Context, id string) (iothub.Device, error) {
	if err := checkID(id); err != nil {
		return iothub.Device{}, err
	}
	var out iothub.Device
	if _, err := c.call(ctx, request{method: http.MethodGet, path: devicePath(id), idempotent: true}, &out); err != nil {
		return iothub.Device{}, fmt.Errorf("service: get device %s: %w", id, err)
	}
	return out, nil
}

// DeleteDevice removes a device identity whatever its etag (If-Match: *).
func (c *Client) DeleteDevice(ctx context.Context, id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	_, err := c.call(ctx, request{method: http.MethodDelete, path: devicePath(id), header: ifMatch("*"), idempotent: true}, nil)
	if err != nil {
		return fmt.Errorf("service: delete device %s: %w", id, err)
	}
	return nil
}

// MaxListDevices is the most devices one ListDevices call returns (the
// service's limit for GET /devices).
const MaxListDevices = 1000

// ListDevices lists up to max device identities (GET /devices?top=max; 0
// means MaxListDevices). For larger registries use Query.
func (c *Client) ListDevices(ctx context.Context, max int) ([]iothub.Device, error) {
	if max <= 0 || max > MaxListDevices {
		max = MaxListDevices
	}
	var out []iothub.Device
	q := url.Values{"top": {strconv.Itoa(max)}}
	if _, err := c.call(ctx, request{method: http.MethodGet, path: "/devices", query: q, idempotent: true}, &out); err != nil {
		return nil, fmt.Errorf("service: list devices: %w", err)
	}
	return out, nil
}

// DeviceConnectionString builds the device connection string
// (HostName=…;DeviceId=…;SharedAccessKey=<primary key>) for d on the hub
// hostname. An X.509 device gets x509=true instead of a key.
func DeviceConnectionString(hostname string, d iothub.Device) (string, error) {
	cs := iothub.ConnectionString{HostName: hostname, DeviceID: d.DeviceID}
	switch {
	case d.Authentication.SymmetricKey != nil && d.Authentication.SymmetricKey.PrimaryKey != "":
		cs.SharedAccessKey = d.Authentication.SymmetricKey.PrimaryKey
	case d.Authentication.Type == iothub.AuthSelfSigned || d.Authentication.Type == iothub.AuthCertificateAuthority:
		cs.X509 = true
	default:
		return "", fmt.Errorf("%w: device %s has no primary key (authentication %q)", ErrInvalid, d.DeviceID, d.Authentication.Type)
	}
	if _, err := iothub.ParseConnectionString(cs.String()); err != nil {
		return "", fmt.Errorf("service: device %s: %w", d.DeviceID, err)
	}
	return cs.String(), nil
}
