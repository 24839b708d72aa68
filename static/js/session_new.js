// The new-session form: offer only the chosen client's brands.
const client = document.getElementById("id_client");
const brand = document.getElementById("id_brand");

if (client && brand) {
  const clientNames = new Map(Array.from(client.options, (o) => [o.value, o.text]));
  const filterBrands = () => {
    const name = clientNames.get(client.value);
    for (const group of brand.querySelectorAll("optgroup")) {
      const match = group.label === name;
      group.hidden = !match;
      group.disabled = !match;
    }
    if (brand.selectedOptions[0]?.parentElement?.disabled) brand.value = "";
  };
  client.addEventListener("change", filterBrands);
  filterBrands();
}
