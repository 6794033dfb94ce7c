package main

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/iothub/service"
)

func (a *app) twinCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "twin", Short: "Read and write device twins"}

	show := &cobra.Command{
		Use:   "show ID",
		Short: "Print a device twin as JSON",
		Args:  exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withClient(func(c *service.Client) error {
				raw, err := c.GetTwinJSON(cmd.Context(), args[0])
				if err != nil {
					return failure(err, args[0])
				}
				var b bytes.Buffer
				if err := json.Indent(&b, raw, "", "  "); err != nil {
					return fmt.Errorf("twin of %s: %w", args[0], err)
				}
				b.WriteByte('\n')
				_, err = b.WriteTo(a.stdout)
				return err
			})
		},
	}

	var desired, etag string
	set := &cobra.Command{
		Use:   "set ID --desired JSON",
		Short: "Merge a patch into the twin's desired properties",
		Long: `Merge a JSON object into properties.desired (JSON merge patch: members are added
or replaced, nested objects merge, null deletes). With --etag the update only
happens if the twin has not changed since that etag was read.`,
		Args: exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var patch map[string]any
			if err := json.Unmarshal([]byte(desired), &patch); err != nil || patch == nil {
				return usageErr("--desired must be a JSON object: %s", desired)
			}
			return a.withClient(func(c *service.Client) error {
				t, err := c.UpdateTwin(cmd.Context(), args[0], service.DesiredPatch(json.RawMessage(desired)), etag)
				if err != nil {
					return failure(err, args[0])
				}
				if a.output == "json" {
					return a.printJSON(t)
				}
				_, err = fmt.Fprintf(a.stdout, "desired properties of %s updated (desired $version %v, etag %s)\n",
					args[0], t.Properties.Desired["$version"], t.ETag)
				return err
			})
		},
	}
	set.Flags().StringVar(&desired, "desired", "", "JSON object to merge into properties.desired")
	set.Flags().StringVar(&etag, "etag", "", "only update if the twin's etag is still this one")
	_ = set.MarkFlagRequired("desired")

	cmd.AddCommand(show, set)
	return cmd
}

func (a *app) queryCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "query SQL",
		Short: "Run a twin query and print the results as JSON",
		Long: `Run an IoT Hub query, for example
  gwctl query "SELECT * FROM devices WHERE properties.reported.firmwareStatus = 'failed'"
and print every result, all pages, as a JSON array. Queries are eventually
consistent; to follow one device use "twin show" or "update --watch".`,
		Args: exactArgs("SQL"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withClient(func(c *service.Client) error {
				items, err := c.Query(cmd.Context(), args[0])
				if err != nil {
					return failure(err, "")
				}
				if items == nil {
					items = []json.RawMessage{}
				}
				return a.printJSON(items)
			})
		},
	}
}
