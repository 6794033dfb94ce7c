package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

type iotDevice = iothub.Device

func (a *app) deviceCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "device", Short: "Register, show, list and delete device identities"}

	var thumbprint, secondary string
	add := &cobra.Command{
		Use:   "add ID",
		Short: "Register a device and print its connection string",
		Long: `Register a device with fresh SAS keys and print its device connection string
(HostName=…;DeviceId=…;SharedAccessKey=…), ready for gwagent's secrets file.
With --x509-thumbprint the device authenticates with a self-signed certificate
instead and the connection string says x509=true.`,
		Args: exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withClient(func(c *service.Client) error {
				id := args[0]
				var err error
				d := iotDevice{}
				if thumbprint != "" {
					d, err = c.CreateX509Device(cmd.Context(), id, thumbprint, secondary)
				} else {
					d, err = c.CreateDevice(cmd.Context(), id)
				}
				if err != nil {
					return failure(err, id)
				}
				s, err := service.DeviceConnectionString(c.HostName(), d)
				if err != nil {
					return failure(err, id)
				}
				if a.output == "json" {
					return a.printJSON(map[string]string{"deviceId": d.DeviceID, "connectionString": s})
				}
				_, err = fmt.Fprintln(a.stdout, s)
				return err
			})
		},
	}
	add.Flags().StringVar(&thumbprint, "x509-thumbprint", "", "register an X.509 (self-signed) device with this primary thumbprint")
	add.Flags().StringVar(&secondary, "x509-secondary-thumbprint", "", "secondary thumbprint of an X.509 device")

	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show a device identity",
		Args:  exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withClient(func(c *service.Client) error {
				d, err := c.GetDevice(cmd.Context(), args[0])
				if err != nil {
					return failure(err, args[0])
				}
				if a.output == "json" {
					return a.printJSON(d)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintf(w, "deviceId:\t%s\n", d.DeviceID)
				fmt.Fprintf(w, "status:\t%s\n", d.Status)
				fmt.Fprintf(w, "connectionState:\t%s\n", d.ConnectionState)
				fmt.Fprintf(w, "lastActivityTime:\t%s\n", d.LastActivityTime)
				fmt.Fprintf(w, "authentication:\t%s\n", d.Authentication.Type)
				if s, err := service.DeviceConnectionString(c.HostName(), d); err == nil {
					fmt.Fprintf(w, "connectionString:\t%s\n", s)
				}
				return w.Flush()
			})
		},
	}

	del := &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a device identity and its twin",
		Args:  exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withClient(func(c *service.Client) error {
				if err := c.DeleteDevice(cmd.Context(), args[0]); err != nil {
					return failure(err, args[0])
				}
				if a.output == "json" {
					return a.printJSON(map[string]any{"deviceId": args[0], "deleted": true})
				}
				_, err := fmt.Fprintf(a.stdout, "deleted %s\n", args[0])
				return err
			})
		},
	}

	var top int
	list := &cobra.Command{
		Use:   "list",
		Short: "List device identities",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withClient(func(c *service.Client) error {
				ds, err := c.ListDevices(cmd.Context(), top)
				if err != nil {
					return failure(err, "")
				}
				if a.output == "json" {
					if ds == nil {
						ds = []iotDevice{}
					}
					return a.printJSON(ds)
				}
				w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "DEVICE\tSTATUS\tCONNECTION\tAUTH\tLAST ACTIVITY")
				for _, d := range ds {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", d.DeviceID, d.Status, d.ConnectionState, d.Authentication.Type, d.LastActivityTime)
				}
				return w.Flush()
			})
		},
	}
	list.Flags().IntVar(&top, "top", service.MaxListDevices, "list at most this many devices")

	cmd.AddCommand(add, show, del, list)
	return cmd
}
