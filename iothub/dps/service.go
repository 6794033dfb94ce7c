package dps

import "encoding/json"

// Attestation types.
const (
	AttestationSymmetricKey = "symmetricKey"
	AttestationX509         = "x509"
	AttestationTPM          = "tpm"
)

// SymmetricKey is a symmetric-key attestation.
type SymmetricKey struct {
	PrimaryKey   string `json:"primaryKey,omitempty"`
	SecondaryKey string `json:"secondaryKey,omitempty"`
}

// AttestationMechanism is how an enrollment's devices prove who they are.
type AttestationMechanism struct {
	Type         string           `json:"type"`
	SymmetricKey *SymmetricKey    `json:"symmetricKey,omitempty"`
	X509         *X509Attestation `json:"x509,omitempty"`
	TPM          json.RawMessage  `json:"tpm,omitempty"`
}

// DeviceCapabilities of an enrollment.
type DeviceCapabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// IndividualEnrollment is one device's enrollment.
type IndividualEnrollment struct {
	RegistrationID     string               `json:"registrationId"`
	DeviceID           string               `json:"deviceId,omitempty"`
	Attestation        AttestationMechanism `json:"attestation"`
	Capabilities       *DeviceCapabilities  `json:"capabilities,omitempty"`
	IoTHubHostName     string               `json:"iotHubHostName,omitempty"`
	InitialTwin        json.RawMessage      `json:"initialTwin,omitempty"`
	ETag               string               `json:"etag,omitempty"`
	ProvisioningStatus string               `json:"provisioningStatus,omitempty"` // enabled (default) or disabled
	RegistrationState  *RegistrationState   `json:"registrationState,omitempty"`
	CreatedDateTimeUTC string               `json:"createdDateTimeUtc,omitempty"`
	LastUpdatedTimeUTC string               `json:"lastUpdatedDateTimeUtc,omitempty"`
	AllocationPolicy   string               `json:"allocationPolicy,omitempty"`
	IoTHubs            []string             `json:"iotHubs,omitempty"`
	ReprovisionPolicy  *ReprovisionPolicy   `json:"reprovisionPolicy,omitempty"`
	CustomAllocation   json.RawMessage      `json:"customAllocationDefinition,omitempty"`
}

// EnrollmentGroup is the enrollment of every device that proves it holds a
// key derived from the group's (or a certificate from its CA).
type EnrollmentGroup struct {
	EnrollmentGroupID  string               `json:"enrollmentGroupId"`
	Attestation        AttestationMechanism `json:"attestation"`
	Capabilities       *DeviceCapabilities  `json:"capabilities,omitempty"`
	IoTHubHostName     string               `json:"iotHubHostName,omitempty"`
	InitialTwin        json.RawMessage      `json:"initialTwin,omitempty"`
	ETag               string               `json:"etag,omitempty"`
	ProvisioningStatus string               `json:"provisioningStatus,omitempty"`
	CreatedDateTimeUTC string               `json:"createdDateTimeUtc,omitempty"`
	LastUpdatedTimeUTC string               `json:"lastUpdatedDateTimeUtc,omitempty"`
	AllocationPolicy   string               `json:"allocationPolicy,omitempty"`
	IoTHubs            []string             `json:"iotHubs,omitempty"`
	ReprovisionPolicy  *ReprovisionPolicy   `json:"reprovisionPolicy,omitempty"`
	CustomAllocation   json.RawMessage      `json:"customAllocationDefinition,omitempty"`
}

// ReprovisionPolicy of an enrollment.
type ReprovisionPolicy struct {
	UpdateHubAssignment bool `json:"updateHubAssignment"`
	MigrateDeviceData   bool `json:"migrateDeviceData"`
}

// QuerySpecification is the body of an enrollment query.
type QuerySpecification struct {
	Query string `json:"query"`
}
