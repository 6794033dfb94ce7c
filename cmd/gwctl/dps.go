package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
	"github.com/gwagent/gwagent/iothub/service"
)

const envDPSConnectionString = "IOTHUB_DPS_CONNECTION_STRING"

// dpsKeyBytes is the length of the keys gwctl generates: what Azure DPS
// generates itself (88 base64 characters).
const dpsKeyBytes = 64

func (a *app) dpsCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dps",
		Short: "Manage Device Provisioning Service enrollments and registrations",
		Long: `The operator's side of the Device Provisioning Service (DPS): symmetric-key
enrollment groups and individual enrollments, registration states, and the
device key a gateway of a group derives from the group key.

The DPS service connection string (policy provisioningserviceowner or one with
enrollment rights) comes from --dps-connection-string or ` + envDPSConnectionString + `;
gwhub writes it to DIR/dps-connection-string. --ca-file and --endpoint apply as
for the hub (gwhub serves DPS on the hub's HTTPS port).`,
	}
	cmd.PersistentFlags().StringVar(&a.dpsConnectionString, "dps-connection-string", "", "DPS service connection string (default $"+envDPSConnectionString+")")
	cmd.AddCommand(a.dpsGroupCommand(), a.dpsEnrollmentCommand(), a.dpsRegistrationCommand(), a.dpsDeriveKeyCommand())
	return cmd
}

// dpsClient builds the DPS service client from the flags and environment.
func (a *app) dpsClient() (*service.Client, error) {
	raw := a.dpsConnectionString
	if raw == "" {
		raw = a.getenv(envDPSConnectionString)
	}
	if raw == "" {
		return nil, usageErr("no DPS connection string: set --dps-connection-string or %s (gwhub: DIR/dps-connection-string)", envDPSConnectionString)
	}
	cs, err := iothub.ParseConnectionString(raw)
	if err != nil {
		return nil, usageErr("DPS connection string: %v", err)
	}
	if !cs.IsService() {
		return nil, usageErr("that is a device connection string; gwctl dps needs a DPS service one (HostName=…;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=…)")
	}
	opts, err := a.serviceOptions("dps")
	if err != nil {
		return nil, err
	}
	c, err := service.NewDPS(cs, opts)
	if err != nil {
		return nil, usageErr("%v", err)
	}
	return c, nil
}

func (a *app) withDPS(f func(c *service.Client) error) error {
	c, err := a.dpsClient()
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	return f(c)
}

// dpsFailure is failure for calls to DPS: what is the subject (an
// enrollment group, an enrollment, a registration) names what was not found.
func dpsFailure(err error, subject string) error {
	var se *iothub.ServiceError
	if errors.As(err, &se) {
		code := se.Code
		if code == 0 {
			code = se.HTTPStatus
		}
		var msg string
		switch {
		case se.HTTPStatus == 404:
			msg = fmt.Sprintf("%s not found (%d)", subject, code)
		case se.HTTPStatus == 401:
			msg = fmt.Sprintf("DPS refused the credentials: check the DPS connection string (%d): %s", code, se.Message)
		case se.HTTPStatus == 412:
			msg = fmt.Sprintf("the etag given is not current: %s changed since it was read (%d)", subject, code)
		case se.HTTPStatus == 429:
			msg = fmt.Sprintf("DPS is throttling requests, try again later (%d)", code)
		default:
			msg = fmt.Sprintf("DPS answered HTTP %d, error %d: %s", se.HTTPStatus, code, se.Message)
		}
		return &exitError{code: exitFailure, msg: msg, err: err}
	}
	var ne net.Error
	var oe *net.OpError
	if !errors.Is(err, context.Canceled) && (errors.As(err, &oe) || errors.As(err, &ne)) {
		return &exitError{code: exitFailure, msg: fmt.Sprintf("cannot reach the provisioning service: %v", err), err: err}
	}
	return failure(err, subject)
}

func isNotFound(err error) bool {
	var se *iothub.ServiceError
	return errors.As(err, &se) && se.HTTPStatus == 404
}

// symmetricKeyFlags are the attestation flags of add: symmetric keys, or
// an X.509 certificate file (a group's CA, --ca-file, or a device's own
// certificate, --cert-file).
type symmetricKeyFlags struct {
	primary, secondary string
	certFile           string
	group              bool // --ca-file (a CA), not --cert-file (a device certificate)
}

func (k *symmetricKeyFlags) add(cmd *cobra.Command, group bool) {
	k.group = group
	cmd.Flags().StringVar(&k.primary, "primary-key", "", "base64 primary key (default: a new random key, printed once)")
	cmd.Flags().StringVar(&k.secondary, "secondary-key", "", "base64 secondary key (default: a new random key, printed once)")
	if group {
		cmd.Flags().StringVar(&k.certFile, "ca-file", "", "X.509 attestation: the CA (or intermediate) certificate, PEM, that signs the devices' certificates")
	} else {
		cmd.Flags().StringVar(&k.certFile, "cert-file", "", "X.509 attestation: the device's certificate, PEM (its CN must be the registration id)")
	}
}

// x509Attestation reads the certificate of --ca-file or --cert-file; for a
// device certificate the CN must be regID.
func (k *symmetricKeyFlags) x509Attestation(regID string) (dps.AttestationMechanism, error) {
	flag := "--cert-file"
	if k.group {
		flag = "--ca-file"
	}
	if k.primary != "" || k.secondary != "" {
		return dps.AttestationMechanism{}, usageErr("%s: X.509 attestation takes no --primary-key or --secondary-key", flag)
	}
	b, err := os.ReadFile(k.certFile)
	if err != nil {
		return dps.AttestationMechanism{}, usageErr("%s: %v", flag, err)
	}
	cert, err := dps.ParseCertificate(string(b))
	if err != nil {
		return dps.AttestationMechanism{}, usageErr("%s %s: %v", flag, k.certFile, err)
	}
	one := &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: string(b)}}
	if k.group {
		if !cert.IsCA {
			return dps.AttestationMechanism{}, usageErr("--ca-file %s: %q is not a CA certificate (basicConstraints CA:TRUE)", k.certFile, cert.Subject.String())
		}
		return dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{SigningCertificates: one}}, nil
	}
	if cert.Subject.CommonName != regID {
		return dps.AttestationMechanism{}, usageErr("--cert-file %s: the certificate's CN %q is not the registration id %q", k.certFile, cert.Subject.CommonName, regID)
	}
	return dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{ClientCertificates: one}}, nil
}

// attestation checks the keys given and generates those that are not, or
// reads the certificate file.
func (k *symmetricKeyFlags) attestation(regID string) (dps.AttestationMechanism, error) {
	if k.certFile != "" {
		return k.x509Attestation(regID)
	}
	keys := [2]string{k.primary, k.secondary}
	for i, name := range []string{"--primary-key", "--secondary-key"} {
		if keys[i] == "" {
			keys[i] = newDPSKey()
			continue
		}
		b, err := base64.StdEncoding.DecodeString(keys[i])
		if err != nil || len(b) < 16 || len(b) > 64 {
			return dps.AttestationMechanism{}, usageErr("%s must be a base64 key of 16 to 64 bytes", name)
		}
	}
	return dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
		SymmetricKey: &dps.SymmetricKey{PrimaryKey: keys[0], SecondaryKey: keys[1]}}, nil
}

func newDPSKey() string {
	b := make([]byte, dpsKeyBytes)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return base64.StdEncoding.EncodeToString(b)
}

func provisioningStatus(disabled bool) string {
	if disabled {
		return "disabled"
	}
	return "enabled"
}

// hideKeys drops the keys of an attestation from what is shown: they are
// printed once, by add (and by show --show-keys).
func hideKeys(a *dps.AttestationMechanism) {
	if a.SymmetricKey != nil {
		a.SymmetricKey = nil
	}
}

func checkID(what, id string) error {
	if !dps.ValidRegistrationID(id) {
		return usageErr("%s %q is not valid: 1-128 lower-case letters, digits and -._: (ending in a letter, digit or -)", what, id)
	}
	return nil
}

func (a *app) dpsGroupCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "group", Short: "Enrollment groups: one group key for a whole factory line"}

	var keys symmetricKeyFlags
	var disabled, edge bool
	var hubHost string
	add := &cobra.Command{
		Use:   "add ID",
		Short: "Create an enrollment group (symmetric key, or X.509 CA with --ca-file)",
		Long: `Create a symmetric-key enrollment group. Each gateway of the group proves
itself with base64(HMAC-SHA256(group key, registration id)), see derive-key.
Without --primary-key and --secondary-key new random keys are generated; they
are printed here, once: keep them in the factory's secret store.

With --ca-file CA.pem the group is an X.509 one instead: every gateway whose
certificate is signed by that CA (or an intermediate of it) and whose CN is
its registration id is admitted.`,
		Args: exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := args[0]
			if err := checkID("enrollment group id", id); err != nil {
				return err
			}
			att, err := keys.attestation(id)
			if err != nil {
				return err
			}
			return a.withDPS(func(c *service.Client) error {
				subject := "enrollment group " + id
				if _, err := c.EnrollmentGroup(cmd.Context(), id); err == nil {
					return &exitError{code: exitFailure, msg: subject + " already exists; delete it first to replace it"}
				} else if !isNotFound(err) {
					return dpsFailure(err, subject)
				}
				g := dps.EnrollmentGroup{EnrollmentGroupID: id, Attestation: att, ProvisioningStatus: provisioningStatus(disabled), IoTHubHostName: hubHost}
				if edge {
					g.Capabilities = &dps.DeviceCapabilities{IoTEdge: true}
				}
				out, err := c.PutEnrollmentGroup(cmd.Context(), g, "")
				if err != nil {
					return dpsFailure(err, subject)
				}
				if att.X509 != nil {
					return a.printCreatedX509(subject, out.ProvisioningStatus, out.Attestation, map[string]any{"enrollmentGroupId": out.EnrollmentGroupID,
						"provisioningStatus": out.ProvisioningStatus, "etag": out.ETag, "attestation": out.Attestation})
				}
				return a.printCreated(subject, out.ProvisioningStatus, att.SymmetricKey, "gwctl dps derive-key --group-key PRIMARY_KEY REGISTRATION_ID", map[string]any{"enrollmentGroupId": out.EnrollmentGroupID,
					"provisioningStatus": out.ProvisioningStatus, "etag": out.ETag, "primaryKey": att.SymmetricKey.PrimaryKey, "secondaryKey": att.SymmetricKey.SecondaryKey})
			})
		},
	}
	keys.add(add, true)
	add.Flags().BoolVar(&disabled, "disabled", false, "create the group disabled (its devices are refused until it is enabled)")
	add.Flags().BoolVar(&edge, "iot-edge", false, "the group's devices are IoT Edge devices")
	add.Flags().StringVar(&hubHost, "iot-hub", "", "host name of the IoT hub to assign the devices to (default: the service's allocation)")

	var showKeys bool
	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show an enrollment group (keys only with --show-keys)",
		Args:  exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withDPS(func(c *service.Client) error {
				g, err := c.EnrollmentGroup(cmd.Context(), args[0])
				if err != nil {
					return dpsFailure(err, "enrollment group "+args[0])
				}
				if !showKeys {
					hideKeys(&g.Attestation)
				}
				if a.output == "json" {
					return a.printJSON(g)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintf(w, "enrollmentGroupId:\t%s\n", g.EnrollmentGroupID)
				fmt.Fprintf(w, "attestation:\t%s\n", g.Attestation.Type)
				fmt.Fprintf(w, "provisioningStatus:\t%s\n", g.ProvisioningStatus)
				printOptional(w, "iotHubHostName", g.IoTHubHostName)
				printOptional(w, "allocationPolicy", g.AllocationPolicy)
				fmt.Fprintf(w, "created:\t%s\n", g.CreatedDateTimeUTC)
				fmt.Fprintf(w, "lastUpdated:\t%s\n", g.LastUpdatedTimeUTC)
				fmt.Fprintf(w, "etag:\t%s\n", g.ETag)
				printKeys(w, g.Attestation.SymmetricKey)
				printX509(w, g.Attestation.X509)
				return w.Flush()
			})
		},
	}
	show.Flags().BoolVar(&showKeys, "show-keys", false, "print the group's keys too")

	list := &cobra.Command{
		Use:   "list",
		Short: "List the enrollment groups",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withDPS(func(c *service.Client) error {
				gs, err := c.EnrollmentGroups(cmd.Context())
				if err != nil {
					return dpsFailure(err, "enrollment groups")
				}
				if gs == nil {
					gs = []dps.EnrollmentGroup{}
				}
				for i := range gs {
					hideKeys(&gs[i].Attestation)
				}
				if a.output == "json" {
					return a.printJSON(gs)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "GROUP\tATTESTATION\tSTATUS\tCREATED")
				for _, g := range gs {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", g.EnrollmentGroupID, g.Attestation.Type, g.ProvisioningStatus, g.CreatedDateTimeUTC)
				}
				return w.Flush()
			})
		},
	}

	del := &cobra.Command{
		Use:   "delete ID",
		Short: "Delete an enrollment group (its devices stay registered on their hub)",
		Args:  exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withDPS(func(c *service.Client) error {
				if err := c.DeleteEnrollmentGroup(cmd.Context(), args[0]); err != nil {
					return dpsFailure(err, "enrollment group "+args[0])
				}
				return a.printDeleted("enrollment group", "enrollmentGroupId", args[0])
			})
		},
	}

	regs := &cobra.Command{
		Use:   "registrations ID",
		Short: "List the registration states of the devices of an enrollment group",
		Args:  exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withDPS(func(c *service.Client) error {
				rs, err := c.GroupRegistrations(cmd.Context(), args[0])
				if err != nil {
					return dpsFailure(err, "enrollment group "+args[0])
				}
				if rs == nil {
					rs = []dps.RegistrationState{}
				}
				if a.output == "json" {
					return a.printJSON(rs)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "REGISTRATION ID\tSTATUS\tDEVICE\tASSIGNED HUB\tLAST UPDATED")
				for _, r := range rs {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", r.RegistrationID, r.Status, r.DeviceID, r.AssignedHub, r.LastUpdatedDateTimeUTC)
				}
				return w.Flush()
			})
		},
	}

	cmd.AddCommand(add, show, list, del, regs)
	return cmd
}

func (a *app) dpsEnrollmentCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "enrollment", Short: "Individual enrollments: one key per device"}

	var keys symmetricKeyFlags
	var disabled, edge bool
	var deviceID, hubHost string
	add := &cobra.Command{
		Use:   "add REGISTRATION_ID",
		Short: "Create an individual enrollment (symmetric key, or X.509 with --cert-file)",
		Long: `Create a symmetric-key individual enrollment for one device. The device
registers with REGISTRATION_ID and the primary (or secondary) key; it is
assigned as --device-id, or as REGISTRATION_ID when none is given. Without
--primary-key and --secondary-key new random keys are generated and printed
here, once.

With --cert-file DEVICE.pem the enrollment is an X.509 one instead: the device
registers with that certificate (matched by thumbprint; its CN must be
REGISTRATION_ID).`,
		Args: exactArgs("REGISTRATION_ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := args[0]
			if err := checkID("registration id", id); err != nil {
				return err
			}
			att, err := keys.attestation(id)
			if err != nil {
				return err
			}
			return a.withDPS(func(c *service.Client) error {
				subject := "enrollment " + id
				if _, err := c.Enrollment(cmd.Context(), id); err == nil {
					return &exitError{code: exitFailure, msg: subject + " already exists; delete it first to replace it"}
				} else if !isNotFound(err) {
					return dpsFailure(err, subject)
				}
				e := dps.IndividualEnrollment{RegistrationID: id, DeviceID: deviceID, Attestation: att,
					ProvisioningStatus: provisioningStatus(disabled), IoTHubHostName: hubHost}
				if edge {
					e.Capabilities = &dps.DeviceCapabilities{IoTEdge: true}
				}
				out, err := c.PutEnrollment(cmd.Context(), e, "")
				if err != nil {
					return dpsFailure(err, subject)
				}
				if att.X509 != nil {
					return a.printCreatedX509(subject, out.ProvisioningStatus, out.Attestation, map[string]any{"registrationId": out.RegistrationID,
						"deviceId": out.DeviceID, "provisioningStatus": out.ProvisioningStatus, "etag": out.ETag, "attestation": out.Attestation})
				}
				return a.printCreated(subject, out.ProvisioningStatus, att.SymmetricKey, "", map[string]any{"registrationId": out.RegistrationID,
					"deviceId": out.DeviceID, "provisioningStatus": out.ProvisioningStatus, "etag": out.ETag,
					"primaryKey": att.SymmetricKey.PrimaryKey, "secondaryKey": att.SymmetricKey.SecondaryKey})
			})
		},
	}
	keys.add(add, false)
	add.Flags().StringVar(&deviceID, "device-id", "", "device id to assign (default: the registration id)")
	add.Flags().BoolVar(&disabled, "disabled", false, "create the enrollment disabled")
	add.Flags().BoolVar(&edge, "iot-edge", false, "the device is an IoT Edge device")
	add.Flags().StringVar(&hubHost, "iot-hub", "", "host name of the IoT hub to assign the device to (default: the service's allocation)")

	var showKeys bool
	show := &cobra.Command{
		Use:   "show REGISTRATION_ID",
		Short: "Show an individual enrollment and its registration state (keys only with --show-keys)",
		Args:  exactArgs("REGISTRATION_ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withDPS(func(c *service.Client) error {
				e, err := c.Enrollment(cmd.Context(), args[0])
				if err != nil {
					return dpsFailure(err, "enrollment "+args[0])
				}
				if !showKeys {
					hideKeys(&e.Attestation)
				}
				if a.output == "json" {
					return a.printJSON(e)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintf(w, "registrationId:\t%s\n", e.RegistrationID)
				printOptional(w, "deviceId", e.DeviceID)
				fmt.Fprintf(w, "attestation:\t%s\n", e.Attestation.Type)
				fmt.Fprintf(w, "provisioningStatus:\t%s\n", e.ProvisioningStatus)
				printOptional(w, "iotHubHostName", e.IoTHubHostName)
				fmt.Fprintf(w, "created:\t%s\n", e.CreatedDateTimeUTC)
				fmt.Fprintf(w, "lastUpdated:\t%s\n", e.LastUpdatedTimeUTC)
				fmt.Fprintf(w, "etag:\t%s\n", e.ETag)
				if r := e.RegistrationState; r != nil {
					fmt.Fprintf(w, "registration:\t%s\n", registrationSummary(*r))
				} else {
					fmt.Fprintf(w, "registration:\tnone yet\n")
				}
				printKeys(w, e.Attestation.SymmetricKey)
				printX509(w, e.Attestation.X509)
				return w.Flush()
			})
		},
	}
	show.Flags().BoolVar(&showKeys, "show-keys", false, "print the enrollment's keys too")

	list := &cobra.Command{
		Use:   "list",
		Short: "List the individual enrollments",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withDPS(func(c *service.Client) error {
				es, err := c.Enrollments(cmd.Context())
				if err != nil {
					return dpsFailure(err, "enrollments")
				}
				if es == nil {
					es = []dps.IndividualEnrollment{}
				}
				for i := range es {
					hideKeys(&es[i].Attestation)
				}
				if a.output == "json" {
					return a.printJSON(es)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "REGISTRATION ID\tDEVICE\tATTESTATION\tSTATUS\tREGISTRATION")
				for _, e := range es {
					reg := "none"
					if e.RegistrationState != nil {
						reg = e.RegistrationState.Status
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", e.RegistrationID, e.DeviceID, e.Attestation.Type, e.ProvisioningStatus, reg)
				}
				return w.Flush()
			})
		},
	}

	del := &cobra.Command{
		Use:   "delete REGISTRATION_ID",
		Short: "Delete an individual enrollment (the device stays registered on its hub)",
		Args:  exactArgs("REGISTRATION_ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withDPS(func(c *service.Client) error {
				if err := c.DeleteEnrollment(cmd.Context(), args[0]); err != nil {
					return dpsFailure(err, "enrollment "+args[0])
				}
				return a.printDeleted("enrollment", "registrationId", args[0])
			})
		},
	}

	cmd.AddCommand(add, show, list, del)
	return cmd
}

func (a *app) dpsRegistrationCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "registration", Short: "Registration states: where DPS assigned a device"}
	show := &cobra.Command{
		Use:   "show REGISTRATION_ID",
		Short: "Show the registration state of a device (assigned hub and device id, or the error)",
		Args:  exactArgs("REGISTRATION_ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withDPS(func(c *service.Client) error {
				r, err := c.Registration(cmd.Context(), args[0])
				if err != nil {
					return dpsFailure(err, "registration "+args[0])
				}
				if a.output == "json" {
					return a.printJSON(r)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintf(w, "registrationId:\t%s\n", r.RegistrationID)
				fmt.Fprintf(w, "status:\t%s\n", r.Status)
				printOptional(w, "substatus", r.Substatus)
				printOptional(w, "assignedHub", r.AssignedHub)
				printOptional(w, "deviceId", r.DeviceID)
				if r.ErrorCode != 0 {
					fmt.Fprintf(w, "error:\t%d %s\n", r.ErrorCode, r.ErrorMessage)
				}
				printOptional(w, "created", r.CreatedDateTimeUTC)
				printOptional(w, "lastUpdated", r.LastUpdatedDateTimeUTC)
				if len(r.Payload) > 0 && string(r.Payload) != "null" {
					fmt.Fprintf(w, "payload:\t%s\n", r.Payload)
				}
				return w.Flush()
			})
		},
	}
	cmd.AddCommand(show)
	return cmd
}

func (a *app) dpsDeriveKeyCommand() *cobra.Command {
	var groupKey, groupKeyFile string
	cmd := &cobra.Command{
		Use:   "derive-key --group-key KEY REGISTRATION_ID",
		Short: "Print the device key of a registration id in a symmetric-key enrollment group",
		Long: `Print base64(HMAC-SHA256(base64-decoded group key, REGISTRATION_ID)): the key a
gateway of a symmetric-key enrollment group registers with, for factory scripts
that write each gateway's own key rather than the group key onto it. Needs no
connection. --group-key-file reads the key from a file ("-" for standard
input) so that it does not show in the process list.`,
		Args: exactArgs("REGISTRATION_ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			regID := args[0]
			if err := checkID("registration id", regID); err != nil {
				return err
			}
			key, err := a.readGroupKey(cmd, groupKey, groupKeyFile)
			if err != nil {
				return err
			}
			derived, err := dps.DeriveKeyBase64(key, regID)
			if err != nil {
				return usageErr("the group key is not base64: pass the enrollment group's primary or secondary key")
			}
			if a.output == "json" {
				return a.printJSON(map[string]string{"registrationId": regID, "key": derived})
			}
			_, err = fmt.Fprintln(a.stdout, derived)
			return err
		},
	}
	cmd.Flags().StringVar(&groupKey, "group-key", "", "the enrollment group's base64 key")
	cmd.Flags().StringVar(&groupKeyFile, "group-key-file", "", "read the group key from this file (\"-\": standard input)")
	cmd.MarkFlagsMutuallyExclusive("group-key", "group-key-file")
	cmd.MarkFlagsOneRequired("group-key", "group-key-file")
	return cmd
}

func (a *app) readGroupKey(cmd *cobra.Command, key, file string) (string, error) {
	if file == "" {
		return strings.TrimSpace(key), nil
	}
	var b []byte
	var err error
	if file == "-" {
		b, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), 4096))
	} else {
		b, err = os.ReadFile(file)
	}
	if err != nil {
		return "", usageErr("--group-key-file: %v", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// printCreated prints what add created with its keys, the only time gwctl
// prints them unasked.
func (a *app) printCreated(subject, status string, k *dps.SymmetricKey, deriveHint string, jsonOut map[string]any) error {
	if a.output == "json" {
		return a.printJSON(jsonOut)
	}
	w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "created %s (%s)\n", subject, status)
	printKeys(w, k)
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(a.stderr, "gwctl: keep the keys now: gwctl shows them again only with show --show-keys")
	if deriveHint != "" {
		fmt.Fprintf(a.stderr, "gwctl: a gateway's own key: %s\n", deriveHint)
	}
	return nil
}

// printCreatedX509 confirms an X.509 enrollment with the certificate's
// subject and thumbprints (there is no secret to keep).
func (a *app) printCreatedX509(subject, status string, att dps.AttestationMechanism, jsonOut map[string]any) error {
	if a.output == "json" {
		return a.printJSON(jsonOut)
	}
	w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "created %s (%s)\n", subject, status)
	printX509(w, att.X509)
	return w.Flush()
}

// printX509 shows the certificates of an X.509 attestation.
func printX509(w *tabwriter.Writer, x *dps.X509Attestation) {
	if x == nil {
		return
	}
	for _, set := range []struct {
		name  string
		certs *dps.X509Certificates
	}{{"clientCertificate", x.ClientCertificates}, {"signingCertificate", x.SigningCertificates}} {
		set.certs.Each(func(c *dps.X509CertificateWithInfo) {
			if c.Info == nil {
				return
			}
			fmt.Fprintf(w, "%s:\t%s (issuer %s)\n", set.name, c.Info.SubjectName, c.Info.IssuerName)
			fmt.Fprintf(w, "  sha1Thumbprint:\t%s\n", c.Info.SHA1Thumbprint)
			fmt.Fprintf(w, "  validUntil:\t%s\n", c.Info.NotAfterUTC)
		})
	}
}

func (a *app) printDeleted(what, field, id string) error {
	if a.output == "json" {
		return a.printJSON(map[string]any{field: id, "deleted": true})
	}
	_, err := fmt.Fprintf(a.stdout, "deleted %s %s\n", what, id)
	return err
}

func printKeys(w *tabwriter.Writer, k *dps.SymmetricKey) {
	if k == nil {
		return
	}
	printOptional(w, "primaryKey", k.PrimaryKey)
	printOptional(w, "secondaryKey", k.SecondaryKey)
}

func printOptional(w *tabwriter.Writer, name, v string) {
	if v != "" {
		fmt.Fprintf(w, "%s:\t%s\n", name, v)
	}
}

func registrationSummary(r dps.RegistrationState) string {
	s := r.Status
	if r.AssignedHub != "" {
		s += " to " + r.AssignedHub + " as " + r.DeviceID
	}
	if r.ErrorCode != 0 {
		s += fmt.Sprintf(" (error %d: %s)", r.ErrorCode, r.ErrorMessage)
	}
	return s
}
